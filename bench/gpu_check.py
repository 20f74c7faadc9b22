"""GPU path check: ptm_ray's model families, freezing and bf16 autocast on one CUDA device, DDP over NCCL.

Runs the same pieces the Ray Train loop runs on a GPU worker (family.build, freeze, param_groups, the
loop's autocast choice, a DDP wrap over an NCCL process group of one GPU) without Ray itself, and prints
fine-tuning throughput in fp32 and in bf16 autocast, side by side, plus an NCCL all-reduce timing.

    python bench/gpu_check.py --weights <efficientnet_lite0 safetensors> --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ptm_ray.config import Config, DataConfig, ModelConfig
from ptm_ray.freeze import freeze, param_groups, set_train_mode
from ptm_ray.models import resolve_model


def _throughput(name: str, weights: str, kwargs: dict, make_batch, bf16: bool, steps: int, depth: int) -> float:
    cfg = Config(model=ModelConfig(name=name, weights=weights, kwargs=kwargs), data=DataConfig(train="x"))
    family, ref = resolve_model(cfg.model)
    torch.manual_seed(0)
    model = family.build(ref, [str(i) for i in range(10)], cfg.model, "classifier")
    blocks = family.blocks(model)
    frozen = freeze(model, blocks, depth)
    optimizer = torch.optim.AdamW(param_groups(model, blocks, 1e-4, 1e-3, 0.9, 0.01))
    model = torch.nn.parallel.DistributedDataParallel(model.cuda(), device_ids=[0])
    inputs, targets = make_batch()
    set_train_mode(model, frozen)
    for step in range(steps + 5):  # 5 warm-up steps
        if step == 5:
            torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            logits = family.logits(model, inputs).float()
        F.cross_entropy(logits, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return steps * len(targets) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "bf16_supported": torch.cuda.is_bf16_supported()}

    t = torch.ones(64 * 1024 * 1024, device="cuda")  # 256 MB all-reduce over NCCL (world of one GPU)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(t)
    torch.cuda.synchronize()
    report["nccl_allreduce_256MB_ms"] = (time.perf_counter() - started) / 10 * 1000
    report["nccl_allreduce_correct"] = bool(t[0].item() == 1.0)

    def images():
        return {"pixel_values": torch.randn(128, 3, 224, 224, device="cuda")}, torch.randint(0, 10, (128,), device="cuda")

    def tokens():
        ids = torch.randint(5, 1000, (64, 128), device="cuda")
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 10, (64,), device="cuda")

    cases = {
        "efficientnet_lite0 (ImageNet weights) 224px batch 128, full fine-tune": (
            "timm:efficientnet_lite0", args.weights, {}, images, 0),
        "efficientnet_lite0 (ImageNet weights) 224px batch 128, lower half frozen": (
            "timm:efficientnet_lite0", args.weights, {}, images, 4),
        "vit_base_patch16_224 (random init) batch 128, full fine-tune": (
            "timm:vit_base_patch16_224", "none", {}, images, 0),
    }
    for label, (name, weights, kwargs, batch, depth) in cases.items():
        fp32 = _throughput(name, weights, kwargs, batch, bf16=False, steps=args.steps, depth=depth)
        bf16 = _throughput(name, weights, kwargs, batch, bf16=True, steps=args.steps, depth=depth)
        report[label] = {"fp32_samples_per_s": round(fp32, 1), "bf16_samples_per_s": round(bf16, 1),
                         "bf16_over_fp32": round(bf16 / fp32, 2)}
        print(label, report[label], flush=True)
    dist.destroy_process_group()
    print(json.dumps(report, indent=2))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
