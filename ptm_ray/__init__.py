"""ptm_ray: fine-tune pretrained models on Ray (Train for fine-tuning, Tune for search, Serve for endpoints)."""

from ptm_ray.checkpoint import Artifact, load_artifact
from ptm_ray.config import Config, load_config
from ptm_ray.train import FitResult, fit

__version__ = "0.1.0"

__all__ = ["Artifact", "Config", "FitResult", "fit", "load_artifact", "load_config"]
