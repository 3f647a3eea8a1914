"""FSDP vs DDP: the training loop's tokens/s and peak memory under each strategy.

Runs :func:`freetf.training.loop.train_loop` twice in one process group of this process
alone (NCCL on a GPU, gloo on the CPU with ``--tiny``): once wrapped in DDP, once sharded
with FSDP2 (:func:`freetf.training.parallel.apply_fsdp`, as Ray Train's workers do), same
config, same steps, alternating the order between rounds.  With one rank FSDP shards
nothing: the ratio is the price of its per-unit gathers, reduce-scatters and mixed
precision against DDP's one all-reduce, which a multi-GPU run pays on top of its
communication.  The default shape is GPT-2 small's blocks (d = 768, 12 layers, 12
heads) on the synthetic task (29 symbols) with H = 16: about 135M parameters, 50M of
them the post-sampler's 2^16 rows.

    python bench/fsdp_vs_ddp.py --json out.json               # a CUDA GPU
    python bench/fsdp_vs_ddp.py --tiny --device cpu           # the pipeline, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from freetf import load_config
from freetf.logs import setup_logging
from freetf.training.context import TrainContext
from freetf.training.loop import train_loop
from freetf.training.parallel import apply_fsdp, is_fsdp

SHAPE = ["model.hidden_dim=768", "model.num_layers=12", "model.num_heads=12",
         "model.latent_dim=16", "training.batch_size=32"]
TINY = ["model.hidden_dim=32", "model.num_layers=2", "model.num_heads=2",
        "model.latent_dim=4", "training.batch_size=4"]


class StrategyContext(TrainContext):
    """One rank of a process group: DDP, or FSDP2 applied before the optimizer."""

    def shard_model(self, model, cfg):
        return apply_fsdp(model, cfg, self.device) if cfg.scaling.strategy == "fsdp" else model

    def prepare_model(self, model):
        if is_fsdp(model):  # sharded already: no DDP on top
            return model
        if self.device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[self.device.index or 0])
        return DistributedDataParallel(model)


def run(strategy: str, device: torch.device, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("freetf/configs/synthetic.yaml", [
            f"scaling.strategy={strategy}", f"training.device={device.type}",
            f"training.max_steps={steps}", f"training.log_every={max(1, steps // 6)}",
            "training.eval_every=0", "tracking.mlflow.enabled=false",
            f"checkpoint.dir={tmp}", "checkpoint.every_steps=0", *extra])
        ctx = StrategyContext(device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = train_loop(cfg, ctx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    rates = [h["train/tokens_per_s"] for h in result.history if "train/tokens_per_s" in h]
    return {"strategy": strategy, "steps": steps, "wall_s": wall,
            # the first log window holds the warm-up (allocator, autotuning): left out
            "tokens_per_s": statistics.median(rates[1:] if len(rates) > 2 else rates),
            "final_loss": result.metrics["train/loss"],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30
            if device.type == "cuda" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2, help="DDP and FSDP once each per round")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--tiny", action="store_true", help="a seconds-sized shape (pipeline check)")
    p.add_argument("--json")
    p.add_argument("--set", action="append", default=[], help="config overrides")
    args = p.parse_args()
    setup_logging()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/fsdp_vs_ddp.py: no CUDA GPU here (use --tiny --device cpu to check it)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29513")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    extra = [*(TINY if args.tiny else SHAPE), *args.set]
    rows = []
    try:
        for i in range(args.rounds):
            order = ("ddp", "fsdp") if i % 2 == 0 else ("fsdp", "ddp")
            rows += [run(strategy, device, args.steps, extra) for strategy in order]
    finally:
        dist.destroy_process_group()
    rate = {s: statistics.median(r["tokens_per_s"] for r in rows if r["strategy"] == s)
            for s in ("ddp", "fsdp")}
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "overrides": extra, "runs": rows,
           "tokens_per_s": rate, "fsdp_over_ddp": rate["fsdp"] / rate["ddp"]}
    for row in rows:
        print(f"{row['strategy']:5s} {row['tokens_per_s']:12.0f} tokens/s  final loss "
              f"{row['final_loss']:.4f}  peak {row['peak_memory_gib'] or 0:.2f} GiB")
    print(f"FSDP / DDP tokens/s: {out['fsdp_over_ddp']:.3f} (median of {args.rounds} rounds)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
