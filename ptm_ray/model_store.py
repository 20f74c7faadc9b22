"""The model store (``search.registry``, ``serve.registry``): promoted checkpoints as immutable, versioned
artifacts. Not to be confused with ``ptm_ray.models.registry``, which maps model names to families.

Layout (local folder by default, any URI pyarrow understands on a cluster)::

    <registry>/<name>/v1/            a full self-describing checkpoint (model/, preprocessor/, config.yaml, ...)
    <registry>/<name>/v1/lineage.json  experiment, trial, source checkpoint, overrides, metrics, time, and the
                                       manifest: every file's size and sha256

Versions are numbered from 1 and never overwritten: a new promotion always takes the next free number.
``lineage.json`` is written last and commits the version: a folder without it (a copy cut short, or one still
being written) is never listed, served or returned as latest, and its number is not reused. ``verify`` checks a
version's files against its manifest (Serve does before deploying one: sizes and hashes on a folder, sizes on
object storage), and loading a version checks the hashes of the copy it loads, so a version damaged after its
promotion is refused instead of served.

Each promotion claims its number with an exclusive create, so concurrent promotions to one name get distinct
versions: ``mkdir`` on a local folder, a conditional write (``If-None-Match: *``, through boto3 and the standard
AWS variables) on ``s3://``. Other object stores have no exclusive create that pyarrow exposes: on those,
promote from one process (a search's driver does).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ModelStore", "ModelVersion", "manifest_problems"]

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
        files = _manifest(source_fs, source)
        while True:  # claim the next free version; a folder that exists already is never written into
            version = (self._versions(name, committed=False) or [0])[-1] + 1
            target = f"{self._base}/{name}/v{version}"
            if self._claim(target):
                break
        pyarrow.fs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=self._fs)
        record = {**lineage, "name": name, "version": version, "source_checkpoint": checkpoint,
                  "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
        self._commit(target, json.dumps(record, indent=2, default=str).encode())
        return ModelVersion(name, version, self._uri(target), record)

    def _claim(self, target: str) -> bool:
        """Create ``target`` (a version's folder) if nobody has: False when another promotion holds it."""
        if "://" not in self.root:
            try:
                Path(target).mkdir(parents=True, exist_ok=False)
                return True
            except FileExistsError:
                return False
        if self.root.startswith("s3://"):
            return _create_if_absent_s3(f"{target}/.claim")
        self._fs.create_dir(target, recursive=True)  # no exclusive create here (see the module's docstring)
        return True

    def _commit(self, target: str, lineage: bytes) -> None:
        """Write ``lineage.json``, which makes the version visible, in one step: readers never see half of it."""
        if "://" in self.root:  # an object is written whole or not at all
            with self._fs.open_output_stream(f"{target}/lineage.json") as f:
                f.write(lineage)
            return
        partial = Path(target) / ".lineage.json.partial"
        partial.write_bytes(lineage)
        os.replace(partial, Path(target) / "lineage.json")

    def verify(self, found: ModelVersion, hashes: bool = True) -> None:
        """Check a version's files against the manifest written when it was promoted: present, of their size,
        and (``hashes``) of their sha256. Sizes alone cost no download on object storage; the Serve replica that
        copies a version from there checks the hashes of its copy (``ptm_ray.checkpoint.load_artifact``).

        Raises:
            ValueError: naming the version and each file that is missing, has another size or another sha256.
        """
        files = found.lineage.get("files")
        if files is None:  # promoted before versions had a manifest: nothing to check against
            return
        problems = manifest_problems(self._fs, f"{self._base}/{found.name}/v{found.version}", files, hashes)
        if problems:
            raise ValueError(f"model {found.name!r} version {found.version} in the registry {self.root} is incomplete "
                             f"or corrupt: {'; '.join(problems)}. Promote the checkpoint again (a new version) or "
                             "deploy another version")

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


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_problems(fs: Any, folder: str, files: dict[str, dict[str, Any]], hashes: bool = True) -> list[str]:
    """What differs between the files under ``folder`` and a version's manifest (``lineage.json``'s ``files``):
    each missing file, other size or (``hashes``) other sha256, as a phrase naming it. Empty when they match."""
    import pyarrow.fs

    problems = []
    for (relative, expected), info in zip(files.items(), fs.get_file_info([f"{folder}/{f}" for f in files])):
        if info.type != pyarrow.fs.FileType.File:
            problems.append(f"{relative} is missing")
        elif info.size != expected["size"]:
            problems.append(f"{relative} has {info.size} bytes, the manifest says {expected['size']}")
        elif hashes and _sha256(fs, info.path) != expected["sha256"]:
            problems.append(f"{relative} does not match its sha256 in the manifest")
    return problems


def _manifest(fs: Any, root: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``root``, sorted by path."""
    import pyarrow.fs

    found = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    files = {info.path[len(root):].lstrip("/"): info for info in found if info.type == pyarrow.fs.FileType.File}
    for own in ("lineage.json", ".claim"):  # a registry version's own records (promoting a version again)
        files.pop(own, None)
    return {relative: {"size": info.size, "sha256": _sha256(fs, info.path)} for relative, info in sorted(files.items())}


def _create_if_absent_s3(path: str) -> bool:
    """Write the empty object ``bucket/key`` unless it exists (S3's conditional write): False when it did."""
    import boto3

    bucket, _, key = path.partition("/")
    client = boto3.client("s3")
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
        return True
    except client.exceptions.ClientError as e:
        # 412: the object exists; 409: another conditional write to it is in flight (try the next number)
        if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
