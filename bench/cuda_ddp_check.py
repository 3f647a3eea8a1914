"""CUDA check of the training loop: NCCL DDP + bf16 autocast, against an fp32 run.

Runs :func:`freetf.training.loop.train_loop` on the GPU inside a NCCL process group (world size
1: the same DDP wrapping and all-reduce path as a multi-GPU run), once with the default
AMP (bf16 autocast on CUDA) and once in fp32, on the synthetic task, and prints the
tokens/s and final losses of both.  Needs no Ray and no MLflow.

    python bench/cuda_ddp_check.py --steps 300 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from freetf import load_config
from freetf.logs import setup_logging
from freetf.training.context import TrainContext
from freetf.training.loop import train_loop


class NcclContext(TrainContext):
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return DistributedDataParallel(model, device_ids=[self.device.index or 0])


def run(amp: str, steps: int, extra: list[str]) -> dict:
    cfg = load_config("freetf/configs/synthetic.yaml", [
        f"training.max_steps={steps}", f"training.amp={amp}", "training.device=cuda",
        "training.log_every=50", "training.eval_every=0", "tracking.mlflow.enabled=false",
        "checkpoint.dir=/tmp/freetf-cuda-check", "scaling.use_ray=false", *extra])
    ctx = NcclContext(device=torch.device("cuda", 0))
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = train_loop(cfg, ctx)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    rates = [h["train/tokens_per_s"] for h in result.history if "train/tokens_per_s" in h]
    return {
        "amp": amp, "steps": steps, "wall_s": wall,
        "tokens_per_s_median": sorted(rates)[len(rates) // 2] if rates else None,
        "final_loss": result.metrics["train/loss"],
        "final_reconstruction": result.metrics["train/ce_nats"],
        "eval_ce_prior": result.metrics.get("eval/ce_prior_nats"),
        "eval_kl_bits": result.metrics.get("eval/kl_bits"),
        "verdict": result.metrics.get("eval/verdict"),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--json")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    setup_logging()
    if not torch.cuda.is_available():
        sys.exit("bench/cuda_ddp_check.py needs a CUDA GPU")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        rows = [run("auto", args.steps, args.set), run("off", args.steps, args.set)]
    finally:
        dist.destroy_process_group()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "backend": "nccl", "runs": rows,
           "bf16_speedup": rows[0]["tokens_per_s_median"] / rows[1]["tokens_per_s_median"]}
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
