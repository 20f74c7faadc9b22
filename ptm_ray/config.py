"""Typed run configuration: nested groups loaded from YAML plus dotted ``key=value`` overrides.

Every field is documented in place. ``load_config`` is the one way a config is made: it rejects unknown
keys, wrong types and impossible values with a ``ValueError`` naming the dotted key and what is allowed,
before any Ray work starts.

Example::

    cfg = load_config("jobs/configs/text_quickstart.yaml", ["optim.lr=3e-5", "scaling.num_workers=1"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

__all__ = [
    "Config",
    "DataConfig",
    "LoraGroup",
    "ModelConfig",
    "OptimConfig",
    "ScalingGroup",
    "SearchConfig",
    "ServeConfig",
    "StorageConfig",
    "TrackingConfig",
    "TrainConfig",
    "config_to_dict",
    "format_overrides",
    "load_config",
    "parse_freeze_depth",
    "storage_path",
    "with_overrides",
]


@dataclass
class LoraGroup:
    r: int = 0
    """LoRA rank (``peft``): 0 turns LoRA off; r > 0 freezes every backbone weight and trains rank-r adapters in
    the blocks above ``model.freeze_depth`` plus the whole head. Checkpoints are saved merged (a plain model)."""
    alpha: float = 16.0
    """LoRA scaling numerator: the adapters' update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=list)
    """Layer names (suffixes, as in peft) that get adapters, e.g. ``[query, value]``; empty: every linear layer of
    the unfrozen blocks (nn.Linear, GPT-2's Conv1D; a block without any: its 2-D convolutions)."""


@dataclass
class ModelConfig:
    name: str = ""
    """Registry name with its source: ``hf:<hub id or local dir>`` or a short name such as ``minilm-l6``."""
    task: str = "classification"
    """What the model is fine-tuned to predict (``ptm_ray.tasks``): ``classification``, ``multilabel``,
    ``detection``, ``speech_recognition`` (CTC), ``text2text`` (T5) or ``text_generation`` (GPT-2)."""
    task_options: dict[str, Any] = field(default_factory=dict)
    """Options of the task, checked by it, e.g. multilabel's ``{label_separator: "|", threshold: tune}``."""
    weights: str = ""
    """Pretrained weights: empty for the source's own (an hf folder, the timm hub), a local file or folder,
    or ``none`` for random initialisation (training from scratch)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments (timm ``create_model``, torchaudio factory), e.g. ``{depth: 2, embed_dim: 32}``."""
    freeze_depth: Union[int, float, str] = 0
    """Frozen lower blocks: an int k, a fraction in (0, 1] of the model's blocks, ``all`` (only the head trains) or 0."""
    max_length: int = 128
    """Longest tokenized input; longer text is truncated."""
    pooling: str = "cls"
    """Text encoders' classifier input: ``cls`` (the first token's state, the model's own head) or ``mean`` (the
    masked mean of the token states, as sentence-transformer checkpoints such as all-MiniLM were trained)."""
    trust_remote_code: bool = False
    """Let Hugging Face run code shipped with the model. Off unless you trust its source."""
    lora: LoraGroup = field(default_factory=LoraGroup)
    """Low-rank adapters instead of full fine-tuning of the unfrozen blocks (``ptm_ray.lora``): ``{r, alpha,
    dropout, target_modules}``."""


@dataclass
class DataConfig:
    train: str = ""
    """Training data: a CSV, JSONL or Parquet file (local path, any URI pyarrow understands, or ``bundled:<file>``)."""
    validation: str | None = None
    """Validation file in the same format; when unset, ``val_fraction`` of ``train`` is held out (text: by a hash
    of the input text, so a row keeps its side as data grows; image and audio files: a seeded split)."""
    val_fraction: float = 0.2
    """Share of ``train`` held out for validation when no validation file is given (on average, for text)."""
    format: str = "auto"
    """``csv``, ``jsonl``, ``parquet`` or ``auto`` (from the file extension); for detection ``coco`` (a JSON
    file) or ``yolo`` (a folder with ``images/<split>``, ``labels/<split>`` and ``data.yaml``)."""
    text_column: str = "text"
    """Column holding the input text (text models)."""
    path_column: str = "path"
    """Manifest column holding image or audio file paths, relative to the manifest's folder or absolute."""
    label_column: str = "label"
    """Column holding the class label."""
    target_column: str = "target"
    """Column holding the target text: the transcript (speech_recognition) or the output text (text2text)."""
    on_bad_file: str = "fail"
    """An unreadable image or audio file: ``fail`` naming it, or ``skip`` it and report how many were skipped."""
    augment: str = "none"
    """Training-only image augmentation: ``none`` or ``light`` (random resized crop, small colour jitter)."""
    hflip: float = 0.0
    """Probability of a horizontal flip when ``augment`` is ``light`` (0 for digits and text-like images)."""
    image_size: int = 0
    """Square input size for images; 0 takes the model's pretrained config."""
    max_seconds: float = 2.0
    """Audio clips are cropped or zero-padded to this duration."""
    materialize: str = "auto"
    """Read the data into Ray's object store once (``always``), stream it from storage every epoch (``never``),
    or ``auto``: once when its files are small (up to 256 MB), else streamed. Streamed data keeps the driver's
    memory flat and the object store's bounded however large the dataset."""
    preprocess: str = "auto"
    """Where classification (and multilabel) inputs are tokenized or decoded, resized and normalised: in the
    training ``workers`` (inside each step), or in Ray Data tasks beside them (``ray_data``: the run's own
    preprocessor, saved with its checkpoints; the workers only pad each batch). ``auto``: ``ray_data`` for text
    when the cluster has 2 or more CPUs the workers do not hold, else ``workers`` (images too: decoded, they fill
    the object store). Augmented training images, the feature cache, a search's trials and the other tasks
    preprocess in the workers."""


@dataclass
class OptimConfig:
    lr: float = 5e-5
    """Learning rate of the backbone (the unfrozen blocks)."""
    head_lr: float | None = None
    """Learning rate of the task head; defaults to ``lr``."""
    layer_decay: float = 1.0
    """Layer-wise LR decay: block i from the top trains at lr * layer_decay**i. 1.0 turns it off."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    scheduler: str = "linear"
    """LR schedule after warm-up: ``linear`` decay to 0, ``cosine``, or ``constant`` (which, as transformers'
    ``constant``, has no warm-up)."""
    warmup_ratio: float = 0.1
    """Share of optimizer steps spent warming up linearly from 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 turns clipping off."""


@dataclass
class TrainConfig:
    epochs: int = 3
    """Most epochs to run (early stopping may end sooner)."""
    batch_size: int = 16
    """Examples per worker per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Seed for initialisation, shuffling and the train/validation split."""
    metric: str = ""
    """Validation metric that ranks checkpoints and drives early stopping; empty: the task's own
    (val_accuracy, val_micro_f1, val_map, val_wer, val_chrf or val_perplexity: ``ptm_ray.tasks``)."""
    mode: str = ""
    """``max`` or ``min``: which direction of ``metric`` is better; empty: the task's own for its default
    metric, else ``min`` for losses, error rates and perplexity and ``max`` for the rest."""
    early_stopping_patience: int = 0
    """Stop after this many epochs without improvement of ``metric``; 0 never stops early."""
    early_stopping_min_delta: float = 0.0
    """Smallest change of ``metric`` that counts as an improvement for early stopping."""
    keep_checkpoints: int = 2
    """Best checkpoints kept by ``metric`` (the latest is kept too, for resuming)."""
    precision: str = "auto"
    """``auto`` (bf16 autocast on GPU, fp32 on CPU), ``bf16`` or ``fp32``."""
    max_steps_per_epoch: int = 0
    """Cap on micro-batches per epoch per worker (0: the whole shard). For smoke tests and benchmarks. Streamed
    training data is then read only up to the rows an epoch takes (the first ones, in the data's order)."""
    shuffle_buffer: int = 256
    """Rows in each worker's local shuffle buffer."""
    feature_cache: Union[bool, str] = "auto"
    """Train on cached outputs of the frozen blocks (``ptm_ray.feature_cache``): ``auto`` where valid (frozen
    depth > 0, ``data.augment=none``, a family that supports it, a local/NFS ``storage.path``), ``on`` (an
    error where invalid) or ``off``. Stored under ``<storage.path>/feature_cache/`` and shared by every run
    and search trial with the same model, depth, preprocessing and data."""


@dataclass
class ScalingGroup:
    num_workers: int = 2
    """Data-parallel training workers."""
    use_gpu: bool = False
    """One GPU per worker."""
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    """Ray resources each worker reserves, e.g. ``{CPU: 4, GPU: 1}``."""
    max_failures: int = 0
    """Worker-group restarts allowed; each restart resumes from the latest checkpoint."""


@dataclass
class StorageConfig:
    path: str = "~/ptm_ray_runs"
    """Where runs and checkpoints go: a local folder (one node) or a shared URI (s3://, gs://, NFS path)."""
    name: str = ""
    """Run name; re-using a name resumes that run. Empty: derived from the model name and time."""


@dataclass
class TrackingConfig:
    mlflow: Union[bool, str] = "auto"
    """MLflow runs (the resolved config as params, per-epoch metrics, the best checkpoint as an artifact; a
    search is a parent run with a child per trial): ``auto`` when mlflow is installed (the ``tracking``
    extra), ``on`` (an error without it) or ``off``."""
    tensorboard: Union[bool, str] = "auto"
    """TensorBoard event files of the per-epoch metrics, in ``<run folder>/tensorboard`` (a search's trials:
    Tune's own, in each trial's folder): ``auto``, ``on`` or ``off``, as for ``mlflow``."""
    uri: str = ""
    """MLflow tracking URI (``http://host:5000`` for a server); empty: the file store ``<storage.path>/mlruns``
    (a local folder: with ``storage.path`` on object storage, ``auto`` tracks nothing unless this is set)."""
    experiment: str = "ptm_ray"
    """MLflow experiment the runs go to."""


@dataclass
class SearchConfig:
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys to search, each ``{choice: [...]}``, ``{grid: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}``. A float freeze depth is a fraction of each
    candidate's own depth, so one space fits models of different depths."""
    algorithm: str = "random"
    """How trials are chosen: ``random`` (grid entries crossed, every other entry drawn at random, seeded by
    ``train.seed``), ``grid``
    (every entry a ``grid``: the full grid), ``tpe`` (Optuna's Bayesian TPE: each trial drawn from the
    scores so far; ``choice``/``uniform``/``loguniform``/``randint`` entries only)."""
    num_samples: int = 1
    """Trials drawn from the space (each grid point is repeated this many times); with ``tpe``, the trials."""
    in_trial: bool = True
    """Single-worker trials train inside the Tune trial itself (no Ray Train worker group to start); multi-worker
    trials always run a Ray Train ``TorchTrainer``. False: every trial starts a worker group (the older path)."""
    scheduler: str = "asha"
    """``asha`` stops weak trials early (per epoch); ``fifo`` runs every trial to the end."""
    grace_period: int = 1
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor of trials at each rung."""
    max_concurrent_trials: int = 1
    """Trials running at once; each needs ``trial_cpus`` plus its workers' resources."""
    trial_cpus: float = 0.5
    """CPUs reserved for each trial's driver (the Tune function that launches the TorchTrainer; it mostly
    waits). Tune also reserves them for the next pending trial ahead of time, and each trial's data reads
    need 0.25 CPU outside both: on 2 CPUs, 1.0 here left nothing for the reads and the search hung."""
    top_k: int = 1
    """Best trials promoted to the model registry."""
    max_latency_ms: float = 0.0
    """Serving budget: trials whose best checkpoint answers one input slower than this (p50, measured on this
    machine after the search) rank after every trial within budget and are not promoted. 0: no budget."""
    max_params: int = 0
    """Size budget: trials whose model has more parameters rank after those within it and are not promoted. 0: none."""
    registry: str = "~/ptm_ray_registry"
    """Model registry folder (local by default; a shared URI on clusters)."""
    registry_name: str = ""
    """Name the promoted versions get in the registry; empty: the experiment name."""
    name: str = ""
    """Experiment name under ``storage.path``; re-using a name restores that search. Empty: derived from time."""


@dataclass
class ServeConfig:
    registry: str = "~/ptm_ray_registry"
    """Model registry the deployed artifacts come from (``search.registry`` writes it)."""
    models: list[dict[str, Any]] = field(default_factory=list)
    """What to deploy: ``[{name: support-intents, versions: [{version: 2, weight: 90}, {version: 3, weight: 10}]}]``;
    ``versions`` defaults to the latest; weights split traffic (canary)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds; anything but loopback needs ``api_key_env`` or ``api_key_file``."""
    port: int = 8000
    """HTTP port of the Serve proxy."""
    proxy_location: str = "EveryNode"
    """Where Serve runs HTTP proxies: ``EveryNode`` (a real cluster: each node answers on ``port``) or
    ``HeadOnly`` (several nodes on one machine, as ``cluster/local.sh`` makes, which would clash on the port)."""
    app_name: str = "ptm_ray"
    """Serve application name."""
    route_prefix: str = "/"
    """URL prefix of the API."""
    max_batch_size: int = 16
    """Most inputs one forward pass batches together. Batching never waits: a pass takes every input queued
    when it starts (those that arrived during the previous pass), so one request alone runs at once."""
    one_hop: bool = True
    """An application serving a single full model version loads it in the HTTP ingress replica itself (HTTP proxy
    -> model replica, one hop) and autoscales that deployment; false, or several versions or models, put each
    version in its own deployment behind the ingress (two hops)."""
    max_variants_per_replica: int = 8
    """Variants of one base (LoRA adapters, heads on a frozen backbone) share replicas that hold the base once and
    load each variant on demand (Ray Serve model multiplexing, least recently used evicted past this many);
    0 gives every variant its own deployment, as a full fine-tune has."""
    min_replicas: int = 1
    """Autoscaling: fewest replicas per model version."""
    max_replicas: int = 2
    """Autoscaling: most replicas per model version."""
    ingress_replicas: int = 1
    """Replicas of the HTTP ingress; 2 or more where availability matters (one can die without losing requests)."""
    target_ongoing_requests: float = 2.0
    """Autoscaling: ongoing requests per replica it aims for."""
    upscale_delay_s: float = 5.0
    """Autoscaling: how long load must stay high before a replica is added."""
    downscale_delay_s: float = 30.0
    """Autoscaling: how long load must stay low before a replica is removed."""
    look_back_period_s: float = 30.0
    """Autoscaling: the window over which ongoing requests are averaged (Serve's ``look_back_period_s``): after a
    burst ends, the average takes up to this long to fall, on top of ``downscale_delay_s``."""
    num_cpus: float = 1.0
    """CPUs per model replica (fractions allowed)."""
    num_gpus: float = 0.0
    """GPUs per model replica (fractions allowed)."""
    max_items: int = 64
    """Most inputs in one request."""
    max_body_bytes: int = 10_000_000
    """Largest request body accepted, counted while it streams in (chunked and multipart bodies too): HTTP 413."""
    max_text_chars: int = 20_000
    """Text models: longer strings are cut to this many characters before tokenizing (the prediction says so)."""
    max_image_pixels: int = 25_000_000
    """Image models: most pixels an image may declare in its header (checked before decoding): HTTP 413."""
    max_audio_seconds: float = 60.0
    """Audio models: longest clip, read from its header before decoding: HTTP 413."""
    request_timeout_s: float = 60.0
    """Longest a prediction may take before the ingress answers 503 with Retry-After."""
    max_queued_requests: int = 100
    """Requests a model deployment queues beyond those running; past it, 503 with Retry-After (Serve's own bound)."""
    top_k: int = 3
    """Labels returned per input unless the request asks for fewer or more (up to the label count)."""
    max_new_tokens: int = 64
    """Generation (text2text, text_generation): the most new tokens a request may ask for."""
    max_num_beams: int = 4
    """Generation: the widest beam search a request may ask for."""
    max_boxes: int = 300
    """Detection: the most boxes per image a request may ask for."""
    api_key_env: str = ""
    """Environment variable holding a bearer token required on every route but ``/healthz`` and the API's own
    description (``/openapi.json``, ``/docs``, ``/redoc``: the schema, no model or data); empty: no key."""
    api_key_file: str = ""
    """File holding that bearer token (alternative to ``api_key_env``)."""
    config_out: str = "serve_config.yaml"
    """Where ``deploy`` writes the declarative Serve config (for ``serve deploy``)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingGroup = field(default_factory=ScalingGroup)
    storage: StorageConfig = field(default_factory=StorageConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")

_LOWER_IS_BETTER = ("loss", "wer", "cer", "perplexity")

_CHOICES = {
    "model.pooling": ("cls", "mean"),
    "data.format": ("auto", "csv", "jsonl", "parquet", "coco", "yolo"),
    "data.on_bad_file": ("fail", "skip"),
    "data.materialize": ("auto", "always", "never"),
    "data.preprocess": ("auto", "workers", "ray_data"),
    "data.augment": ("none", "light"),
    "optim.scheduler": ("linear", "cosine", "constant"),
    "train.mode": ("max", "min"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.feature_cache": ("auto", "on", "off"),
    "tracking.mlflow": ("auto", "on", "off"),
    "tracking.tensorboard": ("auto", "on", "off"),
    "search.scheduler": ("asha", "fifo"),
    "search.algorithm": ("random", "grid", "tpe"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated ``Config`` from a YAML file and dotted ``key=value`` overrides.

    Args:
        path: YAML file with nested groups; ``None`` starts from the defaults.
        overrides: strings like ``optim.lr=3e-5``; values are parsed as YAML scalars.

    Raises:
        ValueError: naming the file or dotted key and what is allowed.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping of groups, got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like group.key=value")
        _set_dotted(raw, key.strip(), _override_value(key.strip(), value))
    cfg = _build(Config, raw, prefix="")
    _check_values(cfg)
    return cfg


def _override_value(key: str, value: str) -> Any:
    """An override's value as YAML reads it (``3e-5``, ``[0, 2]``, ``{choice: [..]}``, ``null``), or its error."""
    if not value.strip():
        return ""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"override {key}={value}: the value is not valid YAML ({problem}); quote a string with "
                         f"YAML's own quotes inside the shell's, e.g. {key}='\"{value}\"'") from None


def storage_path(cfg: Config) -> str:
    """``storage.path`` as Ray Train wants it: a URI as given, a local folder made absolute."""
    return cfg.storage.path if "://" in cfg.storage.path else str(Path(cfg.storage.path).expanduser().resolve())


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML, checkpoints and Ray)."""
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> Config:
    """Inverse of ``config_to_dict``, with the same validation as ``load_config``."""
    cfg = _build(Config, d, prefix="")
    _check_values(cfg)
    return cfg


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with dotted keys set (as a search trial does), validated like ``load_config``."""
    raw = config_to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(raw, key, value)
    return config_from_dict(raw)


def format_overrides(overrides: dict[str, Any]) -> list[str]:
    """``key=value`` strings that ``load_config`` reads back to the same values (to rerun a trial alone)."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
            for k, v in overrides.items()]


def parse_freeze_depth(value: int | float | str, num_blocks: int, key: str = "model.freeze_depth") -> int:
    """Turn a freeze-depth setting into a number of frozen blocks in ``[0, num_blocks]``.

    An int k freezes k blocks, a float f in (0, 1] freezes floor(f * num_blocks), ``all`` freezes all.
    """
    if value == "all":
        return num_blocks
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be an int, a fraction in (0, 1] or 'all', got {value!r}")
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{key}={value} as a fraction must lie in [0, 1]")
        return int(value * num_blocks)
    if not 0 <= value <= num_blocks:
        raise ValueError(
            f"{key}={value} is beyond the model's depth: it has {num_blocks} blocks, so use 0..{num_blocks} "
            "(or a fraction, or 'all')"
        )
    return value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {part} is not a group")
    node[leaf] = value


_RETIRED = {"serve.batch_wait_timeout_s": "batching no longer waits for a batch to fill (a forward pass takes every "
                                        "input queued when it starts); delete the key"}


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown and f"{prefix}{unknown[0]}" in _RETIRED:
        raise ValueError(f"config key {prefix}{unknown[0]} was removed: {_RETIRED[f'{prefix}{unknown[0]}']}")
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}; allowed in this group: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, raw[name] or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(raw[name], kind, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against a field's type, allowing only lossless conversions (int -> float)."""
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(value, option, key)
            except ValueError:
                continue
        allowed = " or ".join(_type_name(o) for o in typing.get_args(kind))
        raise ValueError(f"{key} must be {allowed}, got {value!r}")
    if kind is Any:
        return value
    if kind is type(None):
        if value is None:
            return None
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # PyYAML reads 3e-5 as a string
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif origin is dict:
        _, value_kind = typing.get_args(kind)
        if isinstance(value, dict):
            return {str(k): _coerce(v, value_kind, f"{key}.{k}") for k, v in value.items()}
    elif origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, list):
            return [_coerce(v, item_kind, f"{key}[{i}]") for i, v in enumerate(value)]
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {kind} for {key}")
    raise ValueError(f"{key} must be {_type_name(kind)}, got {value!r}")


def _type_name(kind: Any) -> str:
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _check_values(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for group, name in (("train", "feature_cache"), ("tracking", "mlflow"), ("tracking", "tensorboard")):
        value = getattr(getattr(cfg, group), name)
        if isinstance(value, bool):  # YAML reads a bare on/off as a boolean
            setattr(getattr(cfg, group), name, "on" if value else "off")
    _check_task(cfg)
    for key, allowed in _CHOICES.items():
        group, name = key.split(".")
        value = getattr(getattr(cfg, group), name)
        if value not in allowed:
            raise ValueError(f"{key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
    _check_training(cfg)
    _check_search_and_serve(cfg)
    _check_model_and_data(cfg)
    if cfg.tracking.mlflow == "on" and not cfg.tracking.uri and "://" in cfg.storage.path \
            and not cfg.storage.path.startswith("file://"):
        raise ValueError(f"tracking.mlflow=on needs tracking.uri (an MLflow server, such as http://mlflow:5000) when "
                         f"storage.path is object storage ({cfg.storage.path}): MLflow's file store is a local folder")


def _check_task(cfg: Config) -> None:
    """``model.task`` is a registered task; its options are valid; ``train.metric``/``mode`` default to its own."""
    from ptm_ray.tasks.registry import task_for

    task = task_for(cfg.model.task)
    cfg.model.task_options = task.task_options(cfg.model.task_options)
    if not cfg.train.metric:
        cfg.train.metric = task.metric
    if not cfg.train.mode:
        if cfg.train.metric == task.metric:
            cfg.train.mode = task.mode
        else:
            cfg.train.mode = "min" if cfg.train.metric.endswith(_LOWER_IS_BETTER) else "max"


def _require(values: dict[str, float], minimum: float = 0.0, strict: bool = True) -> None:
    """Each dotted key's value is > ``minimum`` (``strict``) or >= it."""
    for key, value in values.items():
        if value <= minimum if strict else value < minimum:
            raise ValueError(f"{key}={value} must be {'>' if strict else '>='} {minimum:g}")


def _check_training(cfg: Config) -> None:
    opt, train = cfg.optim, cfg.train
    positive = {"optim.lr": opt.lr, "model.max_length": cfg.model.max_length, "train.epochs": train.epochs,
                "train.batch_size": train.batch_size, "train.grad_accum_steps": train.grad_accum_steps,
                "train.keep_checkpoints": train.keep_checkpoints}
    if opt.head_lr is not None:
        positive["optim.head_lr"] = opt.head_lr
    _require(positive)
    _require({"optim.weight_decay": opt.weight_decay, "optim.max_grad_norm": opt.max_grad_norm,
              "train.early_stopping_patience": train.early_stopping_patience,
              "train.early_stopping_min_delta": train.early_stopping_min_delta,
              "train.max_steps_per_epoch": train.max_steps_per_epoch, "train.shuffle_buffer": train.shuffle_buffer,
              "scaling.max_failures": cfg.scaling.max_failures}, strict=False)
    if not 0.0 < opt.layer_decay <= 1.0:
        raise ValueError(f"optim.layer_decay={opt.layer_decay} must lie in (0, 1]")
    if not 0.0 <= opt.warmup_ratio < 1.0:
        raise ValueError(f"optim.warmup_ratio={opt.warmup_ratio} must lie in [0, 1)")
    if cfg.scaling.num_workers < 1:
        raise ValueError(f"scaling.num_workers={cfg.scaling.num_workers} must be >= 1")
    for resource, amount in cfg.scaling.resources_per_worker.items():
        if amount < 0:
            raise ValueError(f"scaling.resources_per_worker.{resource}={amount} must be >= 0")


def _check_search_and_serve(cfg: Config) -> None:
    search, sv = cfg.search, cfg.serve
    _require({"search.num_samples": search.num_samples, "search.grace_period": search.grace_period,
              "search.max_concurrent_trials": search.max_concurrent_trials, "search.top_k": search.top_k,
              "search.trial_cpus": search.trial_cpus})
    if search.max_latency_ms < 0 or search.max_params < 0:
        raise ValueError(f"search.max_latency_ms={search.max_latency_ms} and search.max_params={search.max_params} "
                         "must be >= 0 (0: no budget)")
    if search.reduction_factor < 2:
        raise ValueError(f"search.reduction_factor={search.reduction_factor} must be >= 2")
    _require({f"serve.{key}": getattr(sv, key) for key in (
        "max_batch_size", "max_replicas", "target_ongoing_requests", "max_items", "max_body_bytes", "top_k", "port",
        "max_new_tokens", "max_num_beams", "max_boxes", "max_text_chars", "max_image_pixels", "max_audio_seconds",
        "request_timeout_s", "max_queued_requests", "ingress_replicas")})
    if not 0 <= sv.min_replicas <= sv.max_replicas:
        raise ValueError(f"serve.min_replicas={sv.min_replicas} must lie in 0..serve.max_replicas={sv.max_replicas}")
    if sv.host not in ("127.0.0.1", "localhost", "::1") and not (sv.api_key_env or sv.api_key_file):
        raise ValueError(f"serve.host={sv.host} exposes the endpoints beyond this machine: set serve.api_key_env "
                         "or serve.api_key_file so every route but health needs a bearer token")
    if sv.proxy_location not in ("EveryNode", "HeadOnly"):
        raise ValueError(f"serve.proxy_location={sv.proxy_location!r} must be EveryNode or HeadOnly")


def _check_model_and_data(cfg: Config) -> None:
    data = cfg.data
    if not 0.0 <= data.hflip <= 1.0:
        raise ValueError(f"data.hflip={data.hflip} must lie in [0, 1]")
    if data.max_seconds <= 0 or data.image_size < 0:
        raise ValueError("data.max_seconds must be > 0 and data.image_size >= 0")
    if not 0.0 < data.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={data.val_fraction} must lie in (0, 1)")
    if not cfg.model.name:
        raise ValueError("model.name is required, e.g. model.name=minilm-l6 or model.name=hf:/path/to/model")
    if not data.train:
        raise ValueError("data.train is required: a CSV, JSONL or Parquet file of labelled examples")
    depth = cfg.model.freeze_depth
    if isinstance(depth, str) and depth != "all":
        raise ValueError(f"model.freeze_depth={depth!r} must be an int, a fraction in (0, 1] or 'all'")
    if isinstance(depth, (int, float)) and depth < 0:
        raise ValueError(f"model.freeze_depth={depth} must be >= 0")
    if isinstance(depth, float) and depth > 1.0:
        raise ValueError(f"model.freeze_depth={depth} as a fraction must lie in [0, 1]; use an int for a block count")
    _check_lora(cfg.model.lora)


def _check_lora(lora: LoraGroup) -> None:
    """Ranges of ``model.lora``; which layers it targets is checked against the model (``ptm_ray.lora``)."""
    if lora.r < 0:
        raise ValueError(f"model.lora.r={lora.r} must be >= 0 (0: no LoRA; 8 or 16 are usual ranks)")
    if lora.alpha <= 0:
        raise ValueError(f"model.lora.alpha={lora.alpha} must be > 0 (the update is scaled by alpha / r)")
    if not 0.0 <= lora.dropout < 1.0:
        raise ValueError(f"model.lora.dropout={lora.dropout} must lie in [0, 1)")
    for i, name in enumerate(lora.target_modules):
        if not name.strip() or name != name.strip():
            raise ValueError(f"model.lora.target_modules[{i}]={name!r} must be a layer name such as query or "
                             "c_attn, without spaces")
