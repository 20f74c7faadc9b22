"""Model registry: ``get_adapter(name)`` returns the family adapter for a registry name."""

from ptm_ray.models.registry import SHORT_NAMES, Adapter, adapter_for_source, get_adapter, register_adapter, resolve_name
from ptm_ray.models.text import HFTextAdapter

register_adapter("hf", HFTextAdapter)

__all__ = ["SHORT_NAMES", "Adapter", "adapter_for_source", "get_adapter", "register_adapter", "resolve_name"]
