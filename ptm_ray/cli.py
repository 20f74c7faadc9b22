"""The ``ptm-ray`` command line. Each subcommand parses a config, calls one library function, prints.

    ptm-ray finetune --config jobs/configs/text_quickstart.yaml optim.lr=3e-5 scaling.num_workers=2
"""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _finetune(args: argparse.Namespace) -> int:
    from ptm_ray.config import load_config
    from ptm_ray.train import fit

    cfg = load_config(args.config, args.overrides)  # config errors surface before any Ray work
    result = fit(cfg)
    metric = cfg.train.metric
    print("\n== ptm_ray fine-tuning finished")
    print(f"run folder:       {result.run_path}")
    print(f"best checkpoint:  {result.best_checkpoint}")
    print(f"best {metric}: {result.best_metrics[metric]:.4f} (epoch {result.best_metrics['epoch']})")
    print("epoch  train_loss  val_loss  val_accuracy  val_macro_f1  gap_loss")
    for h in result.history:
        print(f"{h['epoch']:>5}  {h['train_loss']:>10.4f}  {h['val_loss']:>8.4f}  {h['val_accuracy']:>12.4f}  "
              f"{h['val_macro_f1']:>12.4f}  {h['gap_loss']:>+8.4f}")
    keys = ("epoch", "val_loss", "val_accuracy", "val_macro_f1", "trainable_params", "total_params", "stop_reason")
    print("best metrics (json): " + json.dumps({k: result.best_metrics.get(k) for k in keys}))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptm-ray", description="Fine-tune pretrained models on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("finetune", help="data-parallel fine-tuning with Ray Train")
    p.add_argument("--config", required=True, help="YAML config (see jobs/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-5")
    p.set_defaults(func=_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ptm-ray``; returns the exit code (2 for a bad config or bad data)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"ptm-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
