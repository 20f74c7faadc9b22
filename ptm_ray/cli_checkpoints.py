"""``ptm-ray predict`` and ``ptm-ray evaluate``: use a checkpoint, or a registry model, from the command line.

    ptm-ray predict ~/ptm_ray_runs/run/checkpoint_000003 "where is my order?" "cancel it" -p top_k=2
    ptm-ray predict support-intents:2 --registry ~/ptm_ray_quickstart/registry "where is my order?" --json
    ptm-ray predict digits photo1.png photo2.png          # image and audio models take files
    ptm-ray evaluate ~/ptm_ray_runs/run/checkpoint_000003 --data test.csv data.text_column=sentence

Only the standard library is imported at module level (``ptm-ray --help`` stays fast); each command
imports the checkpoint code when it runs.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["add_commands", "format_confusion", "resolve_target"]

_BATCH = 32  # inputs per forward pass


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` and ``evaluate`` subcommands."""
    p = sub.add_parser("predict", help="predictions of a checkpoint or registry model for texts or files",
                       description="Predict with a checkpoint folder or a registry model. Text models take "
                       "strings; image and audio models take files.")
    p.add_argument("model", help="a checkpoint folder (or URI), or a registry model name[:version] "
                   "(latest version without one)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="texts, or image/audio files")
    p.add_argument("--registry", default=None, help="model registry folder or URI (default: the config's "
                   "serve.registry, ~/ptm_ray_registry)")
    p.add_argument("--config", default=None, help="a config whose serve.registry and serve limits apply "
                   "(YAML file or a shipped config's name)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a task option, as an HTTP request's parameters: top_k=2, threshold=0.4, "
                   "score_threshold=0.5, max_new_tokens=20, ...")
    p.add_argument("--json", action="store_true", help="print JSON: one {input, prediction} per input")
    p.set_defaults(func=_predict)
    p = sub.add_parser("evaluate", help="a checkpoint's metrics on a labelled file (confusion matrix for "
                       "classification)", description="Evaluate a checkpoint folder or registry model on a "
                       "labelled file, read with the checkpoint's data settings and scored by its task's "
                       "validation code. Starts a local Ray (or joins RAY_ADDRESS's) for Ray Data.")
    p.add_argument("model", help="a checkpoint folder (or URI), or a registry model name[:version]")
    p.add_argument("--data", required=True, help="CSV/JSONL/Parquet file, image/audio manifest or folder "
                   "with the columns the checkpoint was trained on")
    p.add_argument("overrides", nargs="*", metavar="data.KEY=VALUE",
                   help="data settings that differ from training, e.g. data.text_column=sentence")
    p.add_argument("--registry", default=None, help="model registry folder or URI (default: ~/ptm_ray_registry)")
    p.add_argument("--json", action="store_true", help="print the metrics (and confusion matrix) as JSON")
    p.set_defaults(func=_evaluate)


def resolve_target(target: str, registry: str) -> tuple[str, str]:
    """(checkpoint path or URI, a description) of a checkpoint folder or URI, or a registry ``name[:version]``.

    Raises:
        ValueError: a path that does not exist, a name the registry does not hold, or a version it lacks.
    """
    from ptm_ray.model_store import ModelStore

    if "://" in target:
        return target, target
    local = Path(target).expanduser()
    if local.is_dir() and not (local / "ptm_ray.json").is_file():
        inside = sorted(str(p.parent.relative_to(local)) for p in local.glob("*/ptm_ray.json"))
        raise ValueError(f"{target} is not a ptm_ray checkpoint (it has no ptm_ray.json)"
                         + (f"; checkpoints inside it: {', '.join(inside)}" if inside else ""))
    if local.exists():
        return str(local.resolve()), str(local)
    if "/" in target or target.startswith((".", "~")):
        raise ValueError(f"checkpoint folder {target} does not exist")
    name, _, version = target.partition(":")
    if version and not re.fullmatch(r"v?\d+|latest", version):
        raise ValueError(f"{target}: the version after ':' must be a number (e.g. {name}:2) or 'latest'")
    store = ModelStore(registry)
    if name not in store.names():
        known = ", ".join(store.names()) or "none"
        raise ValueError(f"{target} is not a checkpoint folder, and the registry {store.root} has no model "
                         f"{name!r} (models there: {known}; another registry: --registry DIR)")
    found = store.get(name, version or "latest")
    store.verify(found, hashes=False)  # files there, of their size; loading the version checks their hashes
    return found.path, f"{name} v{found.version} ({found.path})"


def _registry(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The registry root and the serve settings (prediction limits) from the flags and the config."""
    from dataclasses import asdict

    from ptm_ray.config import Config, load_config

    cfg = Config()
    if getattr(args, "config", None):
        from ptm_ray.configs import config_path

        cfg = load_config(config_path(args.config))
    return args.registry or cfg.serve.registry, asdict(cfg.serve)


def _parameters(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as a dict, each value read as YAML (``2`` is a number, ``true`` a boolean)."""
    import yaml

    parameters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"-p {item!r} must look like KEY=VALUE, e.g. -p top_k=2")
        parameters[key.strip()] = yaml.safe_load(value)
    return parameters


def _read_inputs(inputs: list[str], modality: str) -> list[Any]:
    """Texts as given; for image and audio models, each file's bytes, checked to decode."""
    if modality == "text":
        return list(inputs)
    from ptm_ray.data import media_decoder

    decode, contents = media_decoder(modality), []
    for i, name in enumerate(inputs, 1):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"input {i}: {name} {'is a folder' if path.is_dir() else 'does not exist'}; "
                             f"this {modality} model takes {modality} files")
        try:
            data = path.read_bytes()
            decode(data)
        except OSError as e:
            raise ValueError(f"input {i}: cannot read {name}: {e.strerror or e}") from None
        except ValueError as e:
            raise ValueError(f"input {i}: {name} is not a readable {modality} file: {e}") from None
        contents.append(data)
    return contents


def _predict(args: argparse.Namespace) -> int:
    from ptm_ray.checkpoint import load_artifact
    from ptm_ray.inference import predict
    from ptm_ray.tasks import task_for

    registry, settings = _registry(args)
    path, described = resolve_target(args.model, registry)
    artifact = load_artifact(path)
    task = task_for(artifact.task_name)
    options = task.request_options(_parameters(args.param), settings)
    inputs = _read_inputs(args.inputs, artifact.family.modality)
    predictions = []
    for start in range(0, len(inputs), _BATCH):
        predictions += predict(artifact, inputs[start:start + _BATCH], **options)
    if args.json:
        print(json.dumps([{"input": i, "prediction": p} for i, p in zip(args.inputs, predictions)], indent=2))
        return 0
    print(f"{described}: {artifact.task_name}, {artifact.meta.get('model_name')}")
    for given, prediction in zip(args.inputs, predictions):
        shown = given if len(given) <= 60 else given[:57] + "..."
        shown = repr(shown) if artifact.family.modality == "text" else shown
        print(f"{shown:<40} -> {task.describe(prediction)}")
    return 0


def _data_overrides(items: list[str]) -> dict[str, Any]:
    """``data.KEY=VALUE`` strings as dotted overrides; other groups are the checkpoint's own."""
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("data.") or key in ("data.train", "data.validation"):
            raise ValueError(f"override {item!r}: evaluate takes data.KEY=VALUE settings (e.g. "
                             "data.text_column=sentence); the file is --data, the model settings the checkpoint's")
        overrides[key] = yaml.safe_load(value) if value.strip() else ""
    return overrides


def _evaluate(args: argparse.Namespace) -> int:
    from ptm_ray.checkpoint import load_artifact
    from ptm_ray.inference import evaluate

    overrides = _data_overrides(args.overrides)
    path, described = resolve_target(args.model, _registry(args)[0])
    artifact = load_artifact(path)
    result = evaluate(artifact, args.data, overrides, key="--data")
    if args.json:
        print(json.dumps({"model": described, "data": args.data, "task": artifact.task_name,
                          "rows": result.num_rows, "metrics": result.metrics, "labels": result.labels,
                          **result.details}, indent=2))
        return 0
    print(f"{described}: {artifact.task_name} on {args.data} ({result.num_rows} rows)")
    width = max(map(len, result.metrics))
    for name, value in result.metrics.items():
        print(f"  {name:<{width}}  {value:.4f}")
    if "confusion" in result.details:
        print("\nconfusion matrix (rows: true label, columns: predicted):")
        print(format_confusion(result.details["confusion"], result.labels))
    return 0


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """A text table of ``matrix[true][predicted]`` with each label's row total and recall."""
    corner = "true \\ predicted"
    heads = [label if len(label) <= 12 else label[:11] + "~" for label in labels]
    first = max(len(corner), *map(len, heads))
    widths = [max(len(h), len(str(max(col)))) for h, col in zip(heads, zip(*matrix))]
    lines = ["  ".join([f"{corner:<{first}}", *(f"{h:>{w}}" for h, w in zip(heads, widths)), "  total", "recall"])]
    for head, row, i in zip(heads, matrix, range(len(labels))):
        total = sum(row)
        recall = f"{row[i] / total:.3f}" if total else "-"
        lines.append("  ".join([f"{head:<{first}}", *(f"{v:>{w}}" for v, w in zip(row, widths)),
                                f"{total:>7}", f"{recall:>6}"]))
    return "\n".join(lines)
