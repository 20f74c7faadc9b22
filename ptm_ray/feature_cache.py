"""A cache of frozen-prefix outputs, shared by every epoch of a run and every trial of a search.

When the first k blocks of a model are frozen and preprocessing is deterministic (no augmentation),
those blocks compute the same output for an example in every epoch and in every trial that shares the
model, k and preprocessing. ``prepare_cache`` computes those outputs once, with Ray Data actors
(batched, on the workers' kind of device; a search trial that trains itself computes them in its own
process), and stores them under
``<storage.path>/feature_cache/<key>/``; the training loop then feeds the cached features to the
unfrozen top (``family.suffix_logits``) instead of running the whole model.

The key is a sha256 over the model (name, weights fingerprint, constructor kwargs), k, the preprocessing
settings and the data files (paths, sizes, mtimes): a different key never reuses a cache, the same key
always does. Rows are looked up by a digest of their raw input, so the training loop keeps its own Ray
Data pipeline (same shards, same shuffle order as without the cache) and only swaps the model's forward.

On disk: one ``.npy`` array per feature (memory-mapped by the readers, so no process holds all
activations), ``row_key.npy`` (one 20-byte digest per row) and ``meta.json``, which commits a cache: nothing
without it is read. One process in the cluster builds a key (a claim held in a small named Ray actor,
renewed while the build runs, so trials racing for one key build it once and a dead builder's claim lapses
within a minute); the others wait for its ``meta.json``. On a local or NFS path the cache is written into
a temporary folder and renamed into place. On object storage (``s3://``, ``gs://``: ``storage.path``) it
is built in a node-local folder, uploaded with ``meta.json`` last, and each node that reads it downloads it
once into its own local folder (``local_copy``) to memory-map it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ptm_ray.config import Config, config_from_dict, config_to_dict
from ptm_ray.data import DataSummary, resolve_path

if TYPE_CHECKING:
    import ray.data

__all__ = ["CacheInfo", "FeatureStore", "cache_key", "cache_decision", "local_copy", "prepare_cache", "row_digests"]

_FORMAT = 1  # bump when the layout of a cache folder changes


@dataclass(frozen=True)
class CacheInfo:
    """A complete cache folder and what it cost."""

    path: str
    key: str
    size_bytes: int
    built: bool  # False: an existing cache was reused
    build_s: float


def cache_decision(cfg: Config, task: Any, family: Any, model: torch.nn.Module, depth: int) -> tuple[bool, str]:
    """Whether this run can train on cached prefix outputs, and why (or why not).

    ``model`` may live on the meta device: only its architecture is inspected.

    Raises:
        ValueError: for ``train.feature_cache=on`` when the cache would be invalid, naming the reason.
    """
    setting = cfg.train.feature_cache
    if setting == "off":
        return False, "train.feature_cache=off"
    reason = _invalid_reason(cfg, task, family, model, depth)
    if reason is None:
        return True, f"frozen prefix of {depth} block(s) is deterministic"
    if setting == "on":
        raise ValueError(f"train.feature_cache=on but the cache is not valid for this run: {reason}; "
                         "set train.feature_cache=auto (falls back to no cache) or off")
    return False, reason


def _invalid_reason(cfg: Config, task: Any, family: Any, model: torch.nn.Module, depth: int) -> str | None:
    from ptm_ray.models import PrefixCache

    if not task.trains_on_logits:
        return f"model.task={cfg.model.task} trains on more than class scores of its inputs: no cache"
    if depth == 0:
        return "model.freeze_depth is 0: nothing is frozen, so there is no prefix to cache"
    if cfg.data.augment != "none":
        return f"data.augment={cfg.data.augment} makes the prefix's input random in every epoch"
    if not isinstance(family, PrefixCache):
        return f"cache not supported for the {family.name} family"
    return family.cache_unsupported(model, depth)


def cache_key(cfg: Config, family: Any, ref: Any, depth: int, num_blocks: int, summary: DataSummary) -> str:
    """sha256 over model and weights fingerprint, frozen depth, preprocessing and data fingerprint."""
    weights = ref.weights if ref.weights else ref.location.removeprefix("local-dir:")  # timm:local-dir:<folder>
    description = {
        "format": _FORMAT,
        "family": family.name,
        "model": ref.location,
        "weights": _weights_fingerprint(weights, cfg.train.seed),
        "kwargs": cfg.model.kwargs,
        "depth": [depth, num_blocks],
        "preprocessing": {"max_length": cfg.model.max_length, "image_size": cfg.data.image_size,
                          "max_seconds": cfg.data.max_seconds, "augment": cfg.data.augment},
        "data": _data_fingerprint(cfg, summary),
    }
    if cfg.model.pooling != "cls":  # a fully frozen encoder caches the pooled vector (keys of cls runs unchanged)
        description["pooling"] = cfg.model.pooling
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _weights_fingerprint(weights: str, seed: int) -> str:
    """Content hash of the weight files; random init (``none``) is fixed by the run's seed."""
    if weights == "none":
        return f"random-init-seed-{seed}"
    path = Path(weights).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
    elif path.is_file():
        files = [path]
    else:
        return f"source:{weights}"  # a hub id or timm tag: its own (immutable) published weights
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        digest.update(_file_sha256(str(file), file.stat().st_size, file.stat().st_mtime_ns).encode())
    return digest.hexdigest()


_HASHED: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    if (path, size, mtime_ns) not in _HASHED:  # a process hashes each unchanged file once
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        _HASHED[(path, size, mtime_ns)] = digest.hexdigest()
    return _HASHED[(path, size, mtime_ns)]


def _stat(path: str) -> list:
    if "://" in path:
        return [path]
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _data_fingerprint(cfg: Config, summary: DataSummary) -> list:
    """Paths, sizes and mtimes of every input file (rows are keyed by content, so the split does not matter)."""
    if summary.train_files is not None:
        return [_stat(p) for p, _ in summary.train_files + (summary.val_files or [])]
    files = [cfg.data.train] + ([cfg.data.validation] if cfg.data.validation else [])
    return [_stat(resolve_path(f)) + [cfg.data.text_column] for f in files]


def row_digests(inputs: Any) -> list[bytes]:
    """20-byte digests of raw inputs (text or encoded bytes): the row keys of a cache."""
    return [hashlib.sha1(v.encode() if isinstance(v, str) else bytes(v)).digest() for v in inputs]


class _PrefixFn:
    """Ray Data actor: builds the model once (as a training worker does), then runs the frozen prefix per batch."""

    def __init__(self, cfg: dict, labels: list[str], depth: int, threads: int | None, pad_to: int | None) -> None:
        from ptm_ray.models import resolve_model
        from ptm_ray.tasks import task_for

        if threads:  # an actor of its own; in the calling process (threads=None) its setting stays
            torch.set_num_threads(max(1, threads))
        self.cfg = config_from_dict(cfg)
        self.family, ref = resolve_model(self.cfg.model)
        torch.manual_seed(self.cfg.train.seed)  # random-init weights come out as in the training workers
        self.device = torch.device("cuda" if self.cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        head = task_for(self.cfg.model.task).head
        self.model = self.family.build(ref, labels, self.cfg.model, head).to(self.device).eval()
        self.preprocessor = self.family.preprocessor(ref, self.model, self.cfg)
        self.depth, self.pad_to = depth, pad_to

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {k: v.to(self.device) for k, v in self.preprocessor(list(batch["input"]), train=True).items()}
        features = self.family.prefix_forward(self.model, inputs, self.depth)
        digests = b"".join(row_digests(batch["input"]))
        out = {"row_key": np.frombuffer(digests, dtype=np.uint8).reshape(-1, 20)}
        for name, tensor in features.items():
            array = tensor.float().cpu().numpy() if tensor.is_floating_point() else tensor.cpu().numpy()
            if self.pad_to and name in self.family.cache_sequence_features:
                widths = [(0, 0), (0, self.pad_to - array.shape[1])] + [(0, 0)] * (array.ndim - 2)
                array = np.pad(array, widths)
            out[name] = array
        return out


def prepare_cache(cfg: Config, family: Any, ref: Any, labels: list[str], depth: int, num_blocks: int,
                  summary: DataSummary, datasets: dict[str, "ray.data.Dataset"], root: str,
                  in_process: bool = False) -> CacheInfo:
    """Reuse the cache for this run's key under ``root`` (a folder or a URI), or build it from ``datasets``.

    Building streams: Ray Data actors (``scaling.num_workers`` of them, on the workers' kind of device) compute
    the prefix batch by batch and this process appends each batch to memory-mapped arrays, so no process ever
    holds the whole dataset's activations. ``in_process``: this process computes the prefix itself, batch by
    batch, on its own device (a Tune trial that is its run's only worker: it holds the worker's resources,
    and an actor would only add a process start and a second import of torch; a driver on a single node of
    CPUs, where the actors would share the same cores). Another process building
    the same key at the same time is waited for, not duplicated.
    """
    key = cache_key(cfg, family, ref, depth, num_blocks, summary)
    store = _Store(root)
    meta = store.meta(key)
    if meta is None:
        with _BuildClaim(key) as claim:
            meta = claim.wait_or_claim(lambda: store.meta(key))
            if meta is None:  # this process holds the claim and nobody has built the key
                return _build(cfg, family, labels, depth, num_blocks, datasets, store, key, in_process)
    return CacheInfo(store.path(key), key, meta["size_bytes"], False, 0.0)


def _build(cfg: Config, family: Any, labels: list[str], depth: int, num_blocks: int, datasets: dict,
           store: "_Store", key: str, in_process: bool) -> CacheInfo:
    started = time.perf_counter()
    staging = store.staging(key)
    staging.mkdir(parents=True)
    try:
        rows = _write_features(cfg, labels, depth, datasets, staging, family, in_process)
        size = sum(p.stat().st_size for p in staging.iterdir())
        meta = {"key": key, "rows": rows, "depth": depth, "num_blocks": num_blocks, "model": cfg.model.name,
                "size_bytes": size, "build_s": time.perf_counter() - started}
        store.commit(staging, key, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CacheInfo(store.path(key), key, size, True, meta["build_s"])


class _Store:
    """Where caches live: a local (or NFS) folder, or a URI pyarrow understands."""

    def __init__(self, root: str) -> None:
        import pyarrow.fs

        self.root = root.rstrip("/")
        self.remote = "://" in root
        if self.remote:
            self.fs, self.base = pyarrow.fs.FileSystem.from_uri(self.root)

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def meta(self, key: str) -> dict | None:
        """The committed cache's meta.json, or None."""
        if not self.remote:
            file = Path(self.root) / key / "meta.json"
            return json.loads(file.read_text()) if file.is_file() else None
        try:
            with self.fs.open_input_stream(f"{self.base}/{key}/meta.json") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None

    def staging(self, key: str) -> Path:
        """A new folder to build ``key`` in: beside the caches, or on this node for object storage."""
        parent = _node_folder() if self.remote else Path(self.root)
        return parent / f".building-{key}-{uuid.uuid4().hex[:8]}"

    def commit(self, staging: Path, key: str, meta: dict) -> None:
        """Make ``staging`` the cache of ``key``: meta.json goes last, so a reader never sees part of it."""
        if not self.remote:
            (staging / "meta.json").write_text(json.dumps(meta, indent=1))
            _settle(staging, Path(self.root) / key)
            return
        import pyarrow.fs

        local = pyarrow.fs.LocalFileSystem()
        for file in sorted(staging.iterdir()):
            pyarrow.fs.copy_files(str(file), f"{self.base}/{key}/{file.name}", source_filesystem=local,
                                  destination_filesystem=self.fs)
        with self.fs.open_output_stream(f"{self.base}/{key}/meta.json") as f:
            f.write(json.dumps(meta, indent=1).encode())
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        _settle(staging, _node_folder() / key)  # this node's copy, for its readers


def _node_folder() -> Path:
    """This node's folder for copies of caches kept on object storage."""
    return Path(os.environ.get("PTM_RAY_CACHE_DIR", Path(tempfile.gettempdir()) / "ptm_ray_feature_cache"))


def _settle(folder: Path, final: Path) -> None:
    """Rename a complete ``folder`` to ``final``, unless another process on this node got there first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(folder, final)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(folder, ignore_errors=True)


def local_copy(path: str) -> str:
    """A local folder holding the cache ``path``: itself, or for a URI this node's copy (downloaded once)."""
    if "://" not in path:
        return path
    import pyarrow.fs

    key = path.rstrip("/").rsplit("/", 1)[-1]
    final = _node_folder() / key
    if not (final / "meta.json").is_file():
        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        tmp = _node_folder() / f".download-{key}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            pyarrow.fs.copy_files(inner, str(tmp), source_filesystem=fs,
                                  destination_filesystem=pyarrow.fs.LocalFileSystem())
            if not (tmp / "meta.json").is_file():
                raise RuntimeError(f"feature cache {path} has no meta.json: it is not a complete cache")
            _settle(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


# A claim lapses when its holder has not renewed it for this long (a builder renews it every RENEW_S seconds).
CLAIM_TTL_S, RENEW_S = 60.0, 10.0


class _Claims:
    """Named Ray actor (one per cluster): which process is building which cache key, and since when."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, float]] = {}

    def claim(self, key: str, holder: str) -> bool:
        """Take or renew the claim on ``key``; False while another holder's claim is fresh."""
        owner, renewed = self.held.get(key, (holder, 0.0))
        if owner != holder and time.time() - renewed < CLAIM_TTL_S:
            return False
        self.held[key] = (holder, time.time())
        return True

    def release(self, key: str, holder: str) -> None:
        if self.held.get(key, ("",))[0] == holder:
            del self.held[key]


class _BuildClaim:
    """``with _BuildClaim(key) as claim: meta = claim.wait_or_claim(read_meta)``; released on exit."""

    def __init__(self, key: str, timeout_s: float = 3600.0) -> None:
        import ray

        self.key, self.holder, self.timeout_s = key, uuid.uuid4().hex, timeout_s
        # detached: a trial that created it may end while others still need it; a 0-CPU actor for the cluster's life
        self.actor = ray.remote(num_cpus=0)(_Claims).options(
            name="ptm_ray_feature_cache_claims", namespace="ptm_ray", get_if_exists=True, lifetime="detached").remote()
        self.held = False
        self._stop = threading.Event()

    def wait_or_claim(self, read_meta) -> dict | None:
        """The meta of the cache once another process has committed it, or None when this process holds the claim."""
        import ray

        deadline = time.time() + self.timeout_s
        announced = False
        while True:
            meta = read_meta()
            if meta is not None:
                return meta
            if ray.get(self.actor.claim.remote(self.key, self.holder)):
                meta = read_meta()  # committed between the check and the claim
                if meta is not None:
                    return meta
                self.held = True
                threading.Thread(target=self._renew, daemon=True).start()
                return None
            if not announced:
                print(f"[ptm_ray] feature cache {self.key[:12]}: another process is building it; waiting")
                announced = True
            if time.time() > deadline:
                raise TimeoutError(f"feature cache {self.key}: waited {self.timeout_s:.0f} s for another process "
                                   "to build it; rerun, or set train.feature_cache=off")
            time.sleep(1.0)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.actor.claim.remote(self.key, self.holder)

    def __enter__(self) -> "_BuildClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._stop.set()
        if self.held:
            ray.get(self.actor.release.remote(self.key, self.holder))


def _write_features(cfg: Config, labels: list[str], depth: int, datasets: dict, folder: Path, family: Any,
                    in_process: bool) -> int:
    from numpy.lib.format import open_memmap

    from ptm_ray.progress import CountBar

    splits = list(datasets.values())
    total = sum(ds.count() for ds in splits)
    everything = splits[0].union(*splits[1:]) if len(splits) > 1 else splits[0]
    kwargs = {"cfg": config_to_dict(cfg), "labels": labels, "depth": depth,
              "pad_to": cfg.model.max_length if family.modality == "text" else None}
    batch_size = max(cfg.train.batch_size, 32)
    if in_process:
        with torch.random.fork_rng(devices=[]):  # seeds the model's random init without touching this process's RNG
            prefix = _PrefixFn(**kwargs, threads=None)
        features = map(prefix, everything.iter_batches(batch_size=batch_size, batch_format="numpy"))
    else:
        import ray.data

        features = everything.map_batches(
            _PrefixFn,
            fn_constructor_kwargs=kwargs | {"threads": int(cfg.scaling.resources_per_worker.get("CPU", 1) or 1)},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=cfg.scaling.num_workers),
            # a fraction of a CPU, as for reads: a search's trial drivers may hold the whole CPUs of a small node
            num_cpus=0.25,
            num_gpus=1 if cfg.scaling.use_gpu else 0,
        ).iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)
    arrays: dict[str, np.memmap] = {}
    row = 0
    with CountBar(total, f"[ptm_ray] feature cache: {depth} frozen block(s)", "row") as bar:
        for batch in features:
            n = len(batch["row_key"])
            for name, values in batch.items():
                if name not in arrays:
                    arrays[name] = open_memmap(folder / f"{name}.npy", mode="w+", dtype=values.dtype,
                                               shape=(total, *values.shape[1:]))
                arrays[name][row:row + n] = values
            row += n
            bar.update(n)
    for array in arrays.values():
        array.flush()
    if row != total:
        raise RuntimeError(f"feature cache: wrote {row} rows, expected {total}")
    return total


class FeatureStore:
    """Read side of a cache folder: features of a batch of raw inputs, gathered from memory-mapped arrays."""

    def __init__(self, path: str) -> None:
        folder = Path(local_copy(path))
        keys = np.load(folder / "row_key.npy")
        self.index = {k.tobytes(): i for i, k in enumerate(keys)}  # 20 bytes + an int per row; no activations
        self.arrays = {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy") if p.stem != "row_key"}

    def lookup(self, inputs: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """The cached features of each raw input, stacked in order, on ``device``."""
        try:
            rows = np.array([self.index[d] for d in row_digests(inputs)])
        except KeyError:
            raise RuntimeError("feature cache: an input row is missing from the cache (data changed "
                               "without its mtime changing?); rerun with train.feature_cache=off") from None
        order = np.argsort(rows)  # memory maps read fastest in file order
        out = {}
        for name, array in self.arrays.items():
            gathered = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
            gathered[order] = array[rows[order]]
            out[name] = torch.from_numpy(gathered).to(device)
        return out
