"""The shipped YAML configs, installed with the package: ``ptm-ray config list`` lists them and every
``--config`` takes their name (``text_quickstart``) as well as a path.

In a clone they are also ``jobs/configs/<name>.yaml``: that folder is a symlink to this one, so the commands
in the README, the cluster manifests and ``ray job submit --working-dir .`` (which uploads the files the
link points to) keep working.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_path", "shipped_configs"]

_HERE = Path(__file__).parent


def shipped_configs() -> dict[str, Path]:
    """Every shipped config: name (the file name without ``.yaml``) -> absolute path, sorted by name."""
    return {path.stem: path for path in sorted(_HERE.glob("*.yaml"))}


def config_path(config: str | Path) -> Path:
    """The config file ``config`` names: an existing file as given, else a shipped config's name.

    Args:
        config: a path to a YAML file, or a shipped config's name with or without ``.yaml``.

    Raises:
        ValueError: when it is neither, naming it and listing the shipped configs.
    """
    path = Path(config).expanduser()
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = str(config).removesuffix(".yaml")
    if name in shipped:
        return shipped[name]
    raise ValueError(f"config file {config} does not exist, and it is not the name of a shipped config "
                     f"({', '.join(shipped)}; see `ptm-ray config list`)")
