"""GPU training throughput and MFU of a ~125M-parameter baseline and Free Transformer (item 7).

CUDA only (exits with a message elsewhere).  d=768, 12 layers, 12 heads, vocab 32000,
T=1024, batch 16; the baseline and the Free Transformer at H = 8 and H = 16.  A step is
the training loop's: bf16 autocast, forward(mode="training") + compute_loss + backward +
AdamW (fused on CUDA), optionally through ``torch.compile`` (``--compile``: the whole
model, as ``training.compile``; ``--compile blocks``: each block apart, the mapper eager).
A configuration whose first step fails (e.g. under compile) is reported and left out.  Each round
times one step of every configuration and a bf16 square matmul (the GPU's measured peak)
in a rotating order; figures are medians over rounds of per-round values:

- MFU = model FLOPs per second (``common.step_flops_per_token``) / the measured matmul
  peak of the same round, and / the datasheet peak (``--datasheet-tflops``; default
  989.4: H100 SXM and H200, dense bf16).  Target: baseline MFU >= 40%.
- overhead = step time / baseline step time of the same round - 1.  Target: <= 1/L + 5%.

TF32 is off unless ``--tf32`` (PyTorch's and the training loop's default): the binary
mapper computes in fp32 by design; ``--mapper-score-precision autocast`` runs its
backward's s = dL/dr W^T products in bf16 (``model.mapper_score_precision``).

    python bench/gpu.py --json bench/results/gpu.json [--compile [blocks]] [--tf32]
        [--mapper-score-precision autocast]
"""

from __future__ import annotations

import sys

import torch
from common import (
    Shape,
    TrainStep,
    counted_flops,
    environment,
    finish,
    interleaved,
    label,
    matmul_peak,
    median,
    median_of,
    ops_table,
    parser,
    step_config,
    step_flops_per_token,
    table,
    top_ops,
)

GPU_SHAPE = Shape(("model.hidden_dim=768", "model.num_layers=12", "model.num_heads=12",
                   "model.vocab_size=32000", "model.max_seq_len=1024"),
                  batch_size=16, seq_len=1024)
TINY_SHAPE = Shape(("model.hidden_dim=64", "model.num_layers=2", "model.num_heads=2",
                    "model.vocab_size=128", "model.max_seq_len=64"), batch_size=4, seq_len=64)
PEAK = "matmul_peak"
TARGET_MFU = 0.45  # baseline, datasheet bf16 peak, at the batch that fits
TARGET_MFU_B16 = 0.40  # the same at batch 16
MATMULS_PER_PEAK = 5  # back-to-back products per timed peak call (launch cost amortised)


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=20)
    p.set_defaults(warmup=3)
    p.add_argument("--compile", nargs="?", const="model", choices=("model", "blocks"),
                   default=None, help="torch.compile the whole model (as training.compile "
                   "does) or, with 'blocks', each block apart (the mapper stays eager)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 for fp32 matmuls")
    p.add_argument("--mapper-score-precision", choices=("fp32", "autocast"), default="fp32",
                   help="model.mapper_score_precision of the Free Transformers")
    p.add_argument("--cross-entropy", choices=("plain", "chunked"), default="plain",
                   help="training.cross_entropy of every model (chunked: linear + "
                   "cross-entropy without the (B, T, V) fp32 logits)")
    p.add_argument("--datasheet-tflops", type=float, default=989.4,
                   help="the GPU's datasheet dense bf16 peak, TFLOP/s")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--latent-bits", type=int, nargs="*", default=[8, 16],
                   help="Free Transformer H values (none: baseline only)")
    p.add_argument("--profile", action="store_true", help="print each step's top kernels")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
                 "the CPU benchmarks are bench/step_throughput.py and its siblings")
    if args.repeats < 1:
        sys.exit("--repeats must be >= 1")
    if args.clock != "wall":
        sys.exit("bench/gpu.py times GPU work on the wall clock only")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    env = environment()
    device = torch.device("cuda")
    shape = TINY_SHAPE if args.tiny else GPU_SHAPE
    if args.batch_size:
        shape = Shape(shape.overrides, args.batch_size, shape.seq_len)
    optimizer = "fused" if args.optimizer == "auto" else args.optimizer

    steps, failed = {}, {}
    for h in (0, *args.latent_bits):
        extra = (f"training.cross_entropy={args.cross_entropy}",
                 *((f"model.mapper_score_precision={args.mapper_score_precision}",) if h else ()))
        step = TrainStep(step_config(shape, h, *extra, optimizer=optimizer), device=device,
                         amp_dtype=torch.bfloat16)
        if args.compile == "model":
            step.module = torch.compile(step.model)
        elif args.compile == "blocks":
            for block in _blocks(step.model):
                block.compile()
        try:
            step()  # compiles, when asked; a failure is reported, not fatal (but baseline's)
        except Exception as err:  # noqa: BLE001
            if h == 0:
                raise
            failed[label(h)] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1]}"
            print(f"{label(h)} failed its first step, left out: {failed[label(h)]}",
                  file=sys.stderr)
            continue
        steps[label(h)] = step
    mm, mm_flop = matmul_peak(device, torch.bfloat16, 1024 if args.tiny else 8192)
    peak_flop = MATMULS_PER_PEAK * mm_flop
    rounds = interleaved({PEAK: lambda: [mm() for _ in range(MATMULS_PER_PEAK)], **steps},
                         args.repeats, args.warmup, device)

    peak = median_of(rounds, lambda r: peak_flop / r[PEAK])
    datasheet = args.datasheet_tflops * 1e12
    results = {"rounds_s": rounds, "shape": shape.describe(),
               "compile": args.compile, "tf32": args.tf32,
               "mapper_score_precision": args.mapper_score_precision,
               "cross_entropy": args.cross_entropy,
               "matmul_peak_tflops": peak / 1e12, "datasheet_tflops": args.datasheet_tflops,
               "configs": {}, "failed": failed}
    rows = []
    for name, step in steps.items():
        flops = step_flops_per_token(step.cfg.model, shape.seq_len)
        step_flop = flops["total"] * step.tokens
        res = {
            "step_s": median([r[name] for r in rounds]),
            "tokens_per_s": median_of(rounds, lambda r, n=name, s=step: s.tokens / r[n]),
            "achieved_tflops": median_of(rounds, lambda r, n=name, f=step_flop:
                                         f / r[n] / 1e12),
            "mfu_measured_peak": median_of(rounds, lambda r, n=name, f=step_flop:
                                           (f / r[n]) / (peak_flop / r[PEAK])),
            "mfu_datasheet": median_of(rounds, lambda r, n=name, f=step_flop:
                                       f / r[n] / datasheet),
            "overhead_vs_baseline": median_of(rounds, lambda r, n=name: r[n] / r["baseline"])
            - 1.0,
            "model_mflop_per_token": {k: v / 1e6 for k, v in flops.items()},
            "counted_mflop_per_token": _counted(step) / step.tokens / 1e6,
            "peak_memory_gib": _peak_memory(step, device) / 2**30,
            "parameters": step.model.num_parameters()["total"],
        }
        if args.profile:
            res["top_kernels"] = top_ops(step, device)
        results["configs"][name] = res
        rows.append([name, res["parameters"] / 1e6, 1e3 * res["step_s"], res["tokens_per_s"],
                     flops["total"] / 1e6, res["counted_mflop_per_token"],
                     res["achieved_tflops"], 100 * res["mfu_measured_peak"],
                     100 * res["mfu_datasheet"], 100 * res["overhead_vs_baseline"],
                     res["peak_memory_gib"]])
    base_mfu = results["configs"]["baseline"]["mfu_datasheet"]
    min_mfu = TARGET_MFU_B16 if shape.batch_size <= 16 else TARGET_MFU
    results["targets"] = {
        "baseline_mfu_datasheet": {"min": min_mfu, "measured": base_mfu,
                                   "holds": base_mfu >= min_mfu},
        **{f"overhead_{name}": {"max": overhead_budget(steps, name, shape.seq_len),
                                "measured": res["overhead_vs_baseline"],
                                "holds": res["overhead_vs_baseline"]
                                <= overhead_budget(steps, name, shape.seq_len)}
           for name, res in results["configs"].items() if name != "baseline"},
    }
    text = table(["config", "params M", "step ms", "tokens/s", "MFLOP/tok", "counted*",
                  "TFLOP/s", "MFU meas %", "MFU sheet %", "overhead %", "mem GiB"], rows)
    text += (f"\n{env.get('gpu')}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s "
             f"(median, same rounds), datasheet {args.datasheet_tflops:.0f}; "
             f"compile={args.compile}, tf32={args.tf32}, "
             f"mapper_score_precision={args.mapper_score_precision}, "
             f"cross_entropy={args.cross_entropy}, B={shape.batch_size}, "
             f"T={shape.seq_len}, {args.repeats} rounds\n"
             f"* FlopCounterMode count of one eager step; mem = peak allocated during a step "
             f"beyond the memory held before it\n")
    for name, why in failed.items():
        text += f"{name}: FAILED its first step ({why})\n"
    for key, tgt in results["targets"].items():
        bound = f">= {tgt['min']:.0%}" if "min" in tgt else f"<= {tgt['max']:.1%}"
        text += (f"target {key} {bound}: {tgt['measured']:.1%} -> "
                 f"{'holds' if tgt['holds'] else 'FAILS'}\n")
    if args.profile:
        for name, res in results["configs"].items():
            text += f"\ntop kernels, {name} (self GPU time per step):\n"
            text += ops_table(res["top_kernels"]) + "\n"
    finish("gpu", args, results, text.rstrip(), env)


def overhead_budget(steps: dict[str, TrainStep], name: str, seq_len: int) -> float:
    """The Free Transformer's allowed step-time overhead over the baseline.

    H <= 8: 1/L + 5% (the encoder block is about one block's work).  Larger H (the exact
    estimator's 2 x 2^H x D backward): its model-FLOP ratio over the baseline + 10 points.
    """
    model_cfg = steps[name].cfg.model
    if model_cfg.latent_dim <= 8:
        return 1.0 / model_cfg.num_layers + 0.05
    ft = step_flops_per_token(model_cfg, seq_len)["total"]
    base = step_flops_per_token(steps["baseline"].cfg.model, seq_len)["total"]
    return ft / base - 1.0 + 0.10


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [*model.blocks, *([model.encoder] if hasattr(model, "encoder") else [])]


def _counted(step: TrainStep) -> float:
    """FLOPs of one step, with a whole-model compiled wrapper (if any) set aside."""
    module, step.module = step.module, step.model
    try:
        return counted_flops(step)
    finally:
        step.module = module


def _peak_memory(step: TrainStep, device: torch.device) -> int:
    """Bytes allocated at the peak of one step beyond those held before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


if __name__ == "__main__":
    main()
