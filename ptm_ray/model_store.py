"""The model store (``search.registry``, ``serve.registry``): promoted checkpoints as immutable, versioned
artifacts. Not to be confused with ``ptm_ray.models.registry``, which maps model names to families.

Layout (local folder by default, any URI pyarrow understands on a cluster)::

    <registry>/<name>/v1/            a full self-describing checkpoint (model/, preprocessor/, config.yaml, ...)
    <registry>/<name>/v1/lineage.json  experiment, trial, source checkpoint, overrides, metrics, time

Versions are numbered from 1 and never overwritten: a new promotion always takes the next free number.
``lineage.json`` is written last and commits the version: a folder without it (a copy cut short, or one still
being written) is never listed, served or returned as latest, and its number is not reused. On a local
folder the number is claimed atomically (``mkdir``); object stores have no atomic create, so two promotions
to one name on a URI at the same moment could pick the same number: promote from one process (a search's
driver does).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelStore", "ModelVersion"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model in the registry."""

    name: str
    version: int
    path: str
    lineage: dict[str, Any]


class ModelStore:
    """Promote checkpoints into versioned artifacts and look them up by name and version."""

    def __init__(self, root: str) -> None:
        import pyarrow.fs

        self.root = root if "://" in root else str(Path(root).expanduser().resolve())
        if "://" in self.root:
            self._fs, self._base = pyarrow.fs.FileSystem.from_uri(self.root)
        else:
            self._fs, self._base = pyarrow.fs.LocalFileSystem(), self.root

    def _versions(self, name: str, committed: bool = True) -> list[int]:
        """Version numbers of ``name``: those with ``lineage.json`` (``committed``), or every ``v<N>`` folder."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(f"{self._base}/{name}", allow_not_found=True)
        found = [info.base_name for info in self._fs.get_file_info(selector) if info.type == pyarrow.fs.FileType.Directory]
        numbers = sorted(int(v[1:]) for v in found if re.fullmatch(r"v\d+", v))
        if not committed:
            return numbers
        lineage = self._fs.get_file_info([f"{self._base}/{name}/v{n}/lineage.json" for n in numbers])
        return [n for n, info in zip(numbers, lineage) if info.type == pyarrow.fs.FileType.File]

    def promote(self, checkpoint: str, name: str, lineage: dict[str, Any]) -> ModelVersion:
        """Copy ``checkpoint`` to ``<name>/v<next>`` with ``lineage.json``; return the new version.

        Promoting a checkpoint that ``name`` already holds returns that version instead of a copy, so a search
        run again (restored, or re-submitted after it finished) does not register its winners twice.
        """
        import pyarrow.fs

        if not _NAME.match(name):
            raise ValueError(f"registry name {name!r}: use letters, digits, '.', '_' and '-'")
        source_fs, source = pyarrow.fs.FileSystem.from_uri(checkpoint) if "://" in checkpoint else (
            pyarrow.fs.LocalFileSystem(), str(Path(checkpoint).resolve()))
        if source_fs.get_file_info(f"{source}/ptm_ray.json").type != pyarrow.fs.FileType.File:
            raise ValueError(f"{checkpoint} is not a ptm_ray checkpoint (no ptm_ray.json)")
        for existing in self.versions(name):
            if existing.lineage.get("source_checkpoint") == checkpoint:
                return existing
        while True:  # claim the next free version; a folder that exists already is never written into
            version = (self._versions(name, committed=False) or [0])[-1] + 1
            target = f"{self._base}/{name}/v{version}"
            if "://" in self.root:  # no atomic create on object stores (see the module's docstring)
                self._fs.create_dir(target, recursive=True)
                break
            try:
                Path(target).mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                continue
        pyarrow.fs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=self._fs)
        record = {**lineage, "name": name, "version": version, "source_checkpoint": checkpoint,
                  "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with self._fs.open_output_stream(f"{target}/lineage.json") as f:
            f.write(json.dumps(record, indent=2, default=str).encode())
        return ModelVersion(name, version, self._uri(target), record)

    def _uri(self, inner: str) -> str:
        return self.root + inner[len(self._base):] if "://" in self.root else inner

    def names(self) -> list[str]:
        """Registered model names."""
        import pyarrow.fs

        selector = pyarrow.fs.FileSelector(self._base, allow_not_found=True)
        return sorted(i.base_name for i in self._fs.get_file_info(selector) if i.type == pyarrow.fs.FileType.Directory)

    def get(self, name: str, version: int | str = "latest") -> ModelVersion:
        """A registered version (``latest`` by default)."""
        versions = self._versions(name)
        if not versions:
            raise ValueError(f"model {name!r} is not in the registry {self.root}; known: {self.names()}")
        number = versions[-1] if version == "latest" else int(str(version).lstrip("v"))
        if number not in versions:
            raise ValueError(f"model {name!r} in the registry {self.root} has no version {version}; versions: {versions}")
        target = f"{self._base}/{name}/v{number}"
        with self._fs.open_input_stream(f"{target}/lineage.json") as f:
            lineage = json.loads(f.read())
        return ModelVersion(name, number, self._uri(target), lineage)

    def versions(self, name: str) -> list[ModelVersion]:
        """Every version of ``name``, oldest first."""
        return [self.get(name, v) for v in self._versions(name)]
