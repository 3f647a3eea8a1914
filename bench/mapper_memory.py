"""Latent mapper memory and time at H = 16: dense eq. 8 vs the chunked mapper (item 3).

Two views, at the shape of item 1 (``--tiny``: a seconds-sized one):

- whole training step: activation memory (peak RSS of a step minus RSS with parameters,
  gradients and AdamW state allocated, each configuration in a fresh process, median of
  ``--mem-repeats`` steps; see ``common.memory_worker``), the bytes autograd saves for
  backward, and step time (interleaved rounds, median), for H = 8 (chunked), H = 16
  (chunked) and H = 16 (dense).  Target: activation memory at H = 16 <= 1.3x H = 8.
- the mapper alone on N = B T tokens: forward and backward time (interleaved, median)
  and FLOPs per token counted by torch's FlopCounterMode, forward and backward apart.
  The exact estimator needs ~2 2^H D per token backward and a gather forward; a dense
  one-hot matmul forward (and its 2x backward) is the thing to avoid.

    python bench/mapper_memory.py --json bench/results/mapper_memory.json
"""

from __future__ import annotations

import torch
from common import (
    CPU_SHAPE,
    TINY_SHAPE,
    MiB,
    TrainStep,
    activation_memory,
    counted_flops,
    environment,
    finish,
    interleaved,
    matmul_peak,
    median,
    parser,
    ratio,
    setup,
    step_flops_per_token,
    step_overrides,
    table,
    timed,
)

from freetf import load_config
from freetf.model.mapper import BinaryMapper

CONFIGS = {  # name: (H, mapper_impl)
    "ft_h8": (8, "chunked"),
    "ft_h16": (16, "chunked"),
    "ft_h16_dense": (16, "dense"),
}
TARGET_RATIO = 1.3


def mapper_alone(num_bits: int, dim: int, tokens: int, repeats: int, warmup: int
                 ) -> dict[str, dict[str, float]]:
    """Forward / backward seconds and counted FLOPs per token of BinaryMapper, per impl."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, tokens, num_bits, generator=gen).requires_grad_()  # (1, N, H)
    noise = torch.rand(1, tokens, num_bits, generator=gen)
    grad_out = torch.randn(1, tokens, dim, generator=gen)  # dL/dr
    mappers = {}
    for impl in ("chunked", "dense"):
        torch.manual_seed(0)
        mappers[impl] = BinaryMapper(num_bits, dim, "exact", impl)
    times: dict[str, list[tuple[float, float]]] = {impl: [] for impl in mappers}

    def run(impl: str, record: bool) -> None:
        holder = {}
        fwd = timed(lambda: holder.update(r=mappers[impl](logits, noise)[0]))
        bwd = timed(lambda: holder["r"].backward(grad_out))
        if record:
            times[impl].append((fwd, bwd))
        logits.grad = None
        mappers[impl].zero_grad(set_to_none=True)

    for r in range(warmup + repeats):
        for impl in (("chunked", "dense") if r % 2 else ("dense", "chunked")):
            run(impl, record=r >= warmup)
    out = {}
    for impl, mapper in mappers.items():
        fwd_flops, bwd_flops = _counted_fwd_bwd(mapper, logits, noise, grad_out)
        out[impl] = {"forward_s": median([f for f, _ in times[impl]]),
                     "backward_s": median([b for _, b in times[impl]]),
                     "forward_mflop_per_token": fwd_flops / tokens / 1e6,
                     "backward_mflop_per_token": bwd_flops / tokens / 1e6}
    # Per-round ratio, dense / chunked, of forward + backward time.
    out["dense_over_chunked_time"] = median(
        [(df + db) / (cf + cb) for (df, db), (cf, cb) in
         zip(times["dense"], times["chunked"], strict=True)])
    out["reference_mflop_per_token"] = {"2_2H_D": 2 * 2**num_bits * dim / 1e6}
    return out


def _counted_fwd_bwd(mapper: BinaryMapper, logits: torch.Tensor, noise: torch.Tensor,
                     grad_out: torch.Tensor) -> tuple[float, float]:
    """FlopCounterMode FLOPs of the mapper's forward and of its backward."""
    holder = {}
    forward = counted_flops(lambda: holder.update(r=mapper(logits, noise)[0]))
    backward = counted_flops(lambda: holder["r"].backward(grad_out))
    logits.grad = None
    return forward, backward


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=5, memory=True)
    args = p.parse_args()
    setup(args)
    env = environment()
    shape = TINY_SHAPE if args.tiny else CPU_SHAPE
    overrides = {name: step_overrides(shape, h, f"model.mapper_impl={impl}",
                                      optimizer=args.optimizer)
                 for name, (h, impl) in CONFIGS.items()}
    cfgs = {name: load_config(overrides=o) for name, o in overrides.items()}
    tokens = shape.batch_size * shape.seq_len

    memory = {name: activation_memory(o, args.threads, args.mem_repeats)
              for name, o in overrides.items()}
    steps = {name: TrainStep(cfg) for name, cfg in cfgs.items()}
    peak_fn, peak_flop = matmul_peak(torch.device("cpu"), torch.float32,
                                     256 if args.tiny else 2048)
    rounds = interleaved({"matmul_peak": peak_fn, **steps}, args.repeats, args.warmup)
    peak = median([peak_flop / r["matmul_peak"] for r in rounds])
    del steps

    d = cfgs["ft_h16"].model.hidden_dim
    alone = mapper_alone(16, d, tokens, args.repeats, args.warmup)

    results = {"rounds_s": rounds, "shape": shape.describe(),
               "matmul_peak_gflops": peak / 1e9, "configs": {}, "mapper_alone": alone}
    rows = []
    base_act = memory["ft_h8"]["activation_bytes"]
    for name, cfg in cfgs.items():
        mem = memory[name]
        flops = step_flops_per_token(cfg.model, shape.seq_len)["total"]
        res = {**mem,
               "activation_mib": mem["activation_bytes"] / MiB,
               "activation_vs_h8": ratio(mem["activation_bytes"], base_act),
               "step_s": median([r[name] for r in rounds]),
               "step_vs_h8": median([r[name] / r["ft_h8"] for r in rounds]),
               "model_mflop_per_token": flops / 1e6,
               "bound_step_s": flops * tokens / peak}
        results["configs"][name] = res
        rows.append([name, res["activation_mib"], res["activation_vs_h8"],
                     mem["saved_tensor_bytes"] / MiB,
                     (mem["params_bytes"] + mem["grads_bytes"] + mem["optimizer_bytes"]) / MiB,
                     res["step_s"], res["step_vs_h8"], res["bound_step_s"]])
    measured = results["configs"]["ft_h16"]["activation_vs_h8"]
    holds = measured is not None and measured <= TARGET_RATIO
    results["target_activation_h16_vs_h8"] = {"max": TARGET_RATIO, "measured": measured,
                                              "holds": holds}
    text = table(["config", "act MiB", "act/h8", "saved MiB", "state MiB", "step s",
                  "step/h8", "bound s*"], rows)
    text += (f"\n* model FLOPs / measured fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s): a "
             f"lower bound on the step time\nstate = parameters + gradients + AdamW state; "
             f"act = peak RSS of a step - RSS before it ({memory['ft_h8']['method']})\n"
             f"target: activation memory at H=16 <= {TARGET_RATIO}x H=8: "
             f"{'n/a' if measured is None else f'{measured:.2f}x'} -> "
             f"{'holds' if holds else 'FAILS'}\n\n")
    text += f"mapper alone, H=16, D={d}, N={tokens} tokens:\n" + table(
        ["impl", "fwd ms", "bwd ms", "fwd MFLOP/tok", "bwd MFLOP/tok"],
        [[impl, 1e3 * alone[impl]["forward_s"], 1e3 * alone[impl]["backward_s"],
          alone[impl]["forward_mflop_per_token"], alone[impl]["backward_mflop_per_token"]]
         for impl in ("chunked", "dense")])
    text += (f"\nreference 2 * 2^H * D = {alone['reference_mflop_per_token']['2_2H_D']:.1f} "
             f"MFLOP/token; dense / chunked time (fwd + bwd): "
             f"{alone['dense_over_chunked_time']:.2f}x")
    finish("mapper_memory", args, results, text, env)


if __name__ == "__main__":
    main()
