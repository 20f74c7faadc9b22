"""The ``ptm-ray`` command line. Each subcommand parses a config, calls one library function, prints.

    ptm-ray finetune --config jobs/configs/text_quickstart.yaml optim.lr=3e-5 scaling.num_workers=2
    ptm-ray config show --config text_quickstart optim.lr=3e-5      # a shipped config, by name
    ptm-ray predict support-intents:2 "where is my order?"          # a registry model (or a checkpoint folder)
    ptm-ray evaluate <checkpoint> --data test.csv                   # metrics, confusion matrix

Only the standard library and the config loader are imported here: ``--help``, ``--version`` and
``config`` answer without loading torch, Ray or transformers (each command imports what it runs).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from ptm_ray.cli_checkpoints import add_commands as add_checkpoint_commands

__all__ = ["main"]


def _serve_until_interrupted() -> None:
    """Keep this process (and a Ray it started, with Serve in it) alive until Ctrl-C."""
    import time

    print("serving until interrupted (Ctrl-C)")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _finetune(args: argparse.Namespace) -> int:
    from ptm_ray.config import load_config
    from ptm_ray.configs import config_path
    from ptm_ray.train import fit

    cfg = load_config(config_path(args.config), args.overrides)  # config errors surface before any Ray work
    result = fit(cfg)
    metric = cfg.train.metric
    print("\n== ptm_ray fine-tuning finished")
    print(f"run folder:       {result.run_path}")
    print(f"best checkpoint:  {result.best_checkpoint}")
    print(f"best {metric}: {result.best_metrics[metric]:.4f} (epoch {result.best_metrics['epoch']})")
    val_keys = [k for k in result.history[0] if k.startswith("val_")]  # the task's own: val_accuracy, val_wer, ...
    columns = ["train_loss", *val_keys, "gap_loss"]
    print("epoch  " + "  ".join(f"{c:>12}" for c in columns))
    for h in result.history:
        print(f"{h['epoch']:>5}  " + "  ".join(f"{h[c]:>12.4f}" for c in columns))
    keys = ("epoch", *val_keys, "trainable_params", "total_params", "stop_reason")
    print("best metrics (json): " + json.dumps({k: result.best_metrics.get(k) for k in keys}))
    _print_records(result.tracking)
    return 0


def _print_records(tracking: list[str]) -> None:
    """Where the run's records are: MLflow, TensorBoard, Ray's full logs (``--verbose`` prints them live)."""
    from ptm_ray.console import logs_dir

    for line in tracking:
        print(line)
    print(f"full logs (every Ray process): {logs_dir()}")


def _search(args: argparse.Namespace) -> int:
    from ptm_ray.config import load_config
    from ptm_ray.configs import config_path
    from ptm_ray.tune import format_leaderboard, run_search

    cfg = load_config(config_path(args.config), args.overrides)
    result = run_search(cfg)
    print(f"\n== ptm_ray search finished: {result.experiment_path}")
    print(f"leaderboard (ranked by each trial's best {result.metric}, mode {result.mode}; also leaderboard.csv):")
    print(format_leaderboard(result.leaderboard, result.metric))
    print("\nrerun a trial alone: python jobs/finetune.py --config <this config> <its overrides>")
    for row in result.leaderboard[:3]:
        print(f"  #{row.rank} {row.trial_id}: {row.overrides}")
    print("\npromoted to the model registry:")
    for model in result.promoted:
        print(f"  {model.name} v{model.version}  {model.path}  "
              f"({model.lineage['metric']}={model.lineage['best_score']:.4f}, trial {model.lineage['trial_id']})")
    _print_records(result.tracking)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    from ptm_ray.config import load_config
    from ptm_ray.configs import config_path
    from ptm_ray.serve import deploy

    cfg = load_config(config_path(args.config), args.overrides)
    url, config_path = deploy(cfg)
    print("\n== ptm_ray deployed")
    for model in cfg.serve.models:
        print(f"  {model['name']}: POST {url}/v1/models/{model['name']}/predict")
    print(f"models: {url}/v1/models   health: {url}/healthz   OpenAPI: {url}/docs")
    print(f"Serve config for `serve deploy`: {config_path}")
    print(f'try: curl -s -X POST {url}/v1/models/{cfg.serve.models[0]["name"]}/predict '
          "-H 'Content-Type: application/json' -d '{\"inputs\": [\"where is my order\"]}'")
    if args.block:
        _serve_until_interrupted()
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from ptm_ray.quickstart import QuickstartConfigs, run_quickstart

    study = run_quickstart(args.out, QuickstartConfigs(shots=tuple(args.shots)), port=args.port)
    _quickstart_summary(study, args.out)
    if args.keep_serving:
        _serve_until_interrupted()
    else:
        print("the endpoint stops with this process; serve the winner again with:\n"
              f"  .venv/bin/python jobs/deploy.py --config jobs/configs/serve.yaml "
              f"serve.registry={Path(args.out).expanduser().resolve() / 'registry'} --block")
    return 0


def _quickstart_summary(study: dict, out: str) -> None:
    """Where the quickstart's report, registry, endpoint, tracking records and logs are."""
    served = study["serve"]
    print(f"\n== ptm_ray quickstart finished in {study['total_s'] / 60:.1f} min")
    print(f"report:    {study['report']}")
    promoted = ", ".join(f"{m['name']} v{m['version']}" for m in study["promoted"])
    print(f"registry:  {Path(out).expanduser().resolve() / 'registry'}  ({promoted})")
    print(f"endpoint:  POST {served['url']}/v1/models/{served['model']}/predict   (OpenAPI: {served['url']}/docs)")
    _print_records(study.get("tracking", []))


def _report(args: argparse.Namespace) -> int:
    from ptm_ray.report import write_report

    print(f"report: {write_report(args.path, args.out)}")
    return 0


def _config_list(args: argparse.Namespace) -> int:
    from ptm_ray.configs import shipped_configs

    configs = shipped_configs()
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:<{width}}  {_summary(path)}")
    print(f"\n{len(configs)} shipped configs in {next(iter(configs.values())).parent}\n"
          "use one by name (--config text_quickstart) or copy it: ptm-ray config show --config <name> > my.yaml")
    return 0


def _summary(path: Path) -> str:
    """The first sentence of a shipped YAML's leading comment (what it is for), or its file name."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = re.search(r"(?<!\.)\.(\s|$)", text)  # a full stop, not an ellipsis
    return text[: end.start() + 1] if end else text or path.name


def _config_show(args: argparse.Namespace) -> int:
    from ptm_ray.config import Config, load_config
    from ptm_ray.config_docs import format_config
    from ptm_ray.configs import config_path

    if args.config is None and not args.overrides:  # the defaults alone: model.name and data.train stay empty
        print(format_config(Config(), "the defaults (model.name and data.train are required in a real config)"),
              end="")
        return 0
    path = None if args.config is None else config_path(args.config)
    cfg = load_config(path, args.overrides)
    source = " ".join([str(path) if path else "the defaults", *(["+", *args.overrides] if args.overrides else [])])
    print(format_config(cfg, source), end="")
    return 0


def _version() -> str:
    """This package's version and those of the stack it runs on, read from package metadata (no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    from ptm_ray import __version__

    stack = []
    for dist in ("torch", "ray", "transformers"):
        try:
            stack.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            stack.append(f"{dist} not installed")
    return f"ptm-ray {__version__} ({', '.join(stack)}, python {sys.version.split()[0]})"


class _VersionAction(argparse.Action):
    """``--version``, whose text is only computed when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the versions of ptm-ray, torch, Ray and "
                         "transformers, and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        print(_version())
        parser.exit()


def _add_verbose(parser: argparse.ArgumentParser, default: object = argparse.SUPPRESS) -> None:
    """``--verbose``, before or after the command (a subcommand's SUPPRESS default keeps the main one's)."""
    parser.add_argument("--verbose", action="store_true", default=default,
                        help="print everything: Ray's and the libraries' logs and every worker's output (as "
                        "PTM_RAY_VERBOSE=1 does); by default they only go to Ray's session log files")


_CONFIG_HELP = "YAML file, or the name of a shipped config (ptm-ray config list)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptm-ray", description="Fine-tune pretrained models on Ray.")
    parser.add_argument("--version", action=_VersionAction)
    _add_verbose(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="data-parallel fine-tuning with Ray Train")
    p.add_argument("--config", required=True, help=_CONFIG_HELP)
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-5")
    _add_verbose(p)
    p.set_defaults(func=_finetune)
    p = sub.add_parser("search", help="Ray Tune search over models, freeze depths and learning rates")
    p.add_argument("--config", required=True, help=_CONFIG_HELP + " with a search: group")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as search.num_samples=4")
    _add_verbose(p)
    p.set_defaults(func=_search)
    p = sub.add_parser("deploy", help="deploy registry models on Ray Serve behind an HTTP API")
    p.add_argument("--config", required=True, help=_CONFIG_HELP + " with a serve: group")
    p.add_argument("--block", action="store_true",
                   help="keep this process (and a Ray it started) alive; not needed on a running cluster")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as serve.port=8001")
    _add_verbose(p)
    p.set_defaults(func=_deploy)
    p = sub.add_parser("quickstart", help="fine-tune, compare, search, deploy and report, on a local Ray")
    p.add_argument("--out", default="~/ptm_ray_quickstart", help="folder for runs, registry and report")
    p.add_argument("--shots", type=int, nargs="+", default=[5, 20], help="digits per class in the data sweep")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the served endpoint (127.0.0.1)")
    p.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    _add_verbose(p)
    p.set_defaults(func=_quickstart)
    p = sub.add_parser("report", help="HTML report (plots embedded) of a quickstart, search or run folder")
    p.add_argument("path", help="a quickstart folder (study.json), search folder (leaderboard.csv) or run folder")
    p.add_argument("--out", default=None, help="where to write it (default: <path>/report.html)")
    p.set_defaults(func=_report)
    add_checkpoint_commands(sub)
    p = sub.add_parser("config", help="the shipped configs, and any config resolved with its defaults and docs")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    q = config_sub.add_parser("list", help="the configs shipped with ptm_ray, usable by name in --config")
    q.set_defaults(func=_config_list)
    q = config_sub.add_parser("show", help="a config resolved (file + overrides + defaults) as YAML, each field "
                              "with its doc; changed values show their default")
    q.add_argument("--config", default=None, help=_CONFIG_HELP + "; none: the defaults")
    q.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-5")
    q.set_defaults(func=_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ptm-ray``; returns the exit code (2 for a bad config or bad data, 1 for a missing extra)."""
    from ptm_ray._optional import MissingExtraError

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (``evaluate CKPT --data F data.text_column=x``) are overrides too
        if not hasattr(args, "overrides") or any(item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    if args.verbose:
        from ptm_ray.console import set_verbose

        set_verbose()
    try:
        return args.func(args)
    except ValueError as e:
        print(f"ptm-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MissingExtraError as e:
        print(f"ptm-ray {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
