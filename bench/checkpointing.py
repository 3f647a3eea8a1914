"""Gradient checkpointing: activation memory saved and step-time cost (issue 7, item 6).

``FreeTransformer.gradient_checkpointing_enable()`` recomputes each block (decoder blocks
and the encoder block) in backward.  For the baseline and the Free Transformer at H = 8
and H = 16, at the shape of item 1: activation memory with and without (each in a fresh
process; ``common.memory_worker``) and step time (interleaved rounds; cost = checkpointed
/ plain step time of the same round, median).

    python bench/checkpointing.py --json bench/results/checkpointing.json
"""

from __future__ import annotations

from common import (
    CPU_SHAPE,
    TINY_SHAPE,
    MiB,
    TrainStep,
    activation_memory,
    environment,
    finish,
    interleaved,
    label,
    median,
    parser,
    ratio,
    setup,
    step_overrides,
    table,
)

from freetf import load_config

H_VALUES = (0, 8, 16)


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=5, memory=True)
    args = p.parse_args()
    setup(args)
    env = environment()
    shape = TINY_SHAPE if args.tiny else CPU_SHAPE
    overrides = {label(h): step_overrides(shape, h, optimizer=args.optimizer) for h in H_VALUES}

    memory = {(name, ckpt): activation_memory(o, args.threads, args.mem_repeats,
                                              checkpointing=ckpt)
              for name, o in overrides.items() for ckpt in (False, True)}
    steps = {}
    for name, o in overrides.items():
        cfg = load_config(overrides=o)
        steps[name] = TrainStep(cfg)
        steps[f"{name}/ckpt"] = TrainStep(cfg)
        steps[f"{name}/ckpt"].model.gradient_checkpointing_enable()
    rounds = interleaved(steps, args.repeats, args.warmup)

    results = {"rounds_s": rounds, "shape": shape.describe(), "configs": {}}
    rows = []
    for name in overrides:
        plain, ckpt = memory[(name, False)], memory[(name, True)]
        res = {
            "plain_activation_mib": plain["activation_bytes"] / MiB,
            "ckpt_activation_mib": ckpt["activation_bytes"] / MiB,
            "ckpt_over_plain_activation": ratio(ckpt["activation_bytes"],
                                                plain["activation_bytes"]),
            "plain_saved_tensor_mib": plain["saved_tensor_bytes"] / MiB,
            "ckpt_saved_tensor_mib": ckpt["saved_tensor_bytes"] / MiB,
            "plain_step_s": median([r[name] for r in rounds]),
            "ckpt_step_s": median([r[f"{name}/ckpt"] for r in rounds]),
            "step_time_ratio": median([r[f"{name}/ckpt"] / r[name] for r in rounds]),
        }
        results["configs"][name] = res
        rows.append([name, res["plain_activation_mib"], res["ckpt_activation_mib"],
                     _saved_percent(res["ckpt_over_plain_activation"]), res["plain_step_s"],
                     res["ckpt_step_s"], res["step_time_ratio"]])
    text = table(["config", "act MiB", "ckpt act MiB", "saved %", "step s", "ckpt step s",
                  "time ratio"], rows)
    text += (f"\nact = peak RSS of a training step - RSS with parameters, gradients and AdamW "
             f"state allocated ({memory[(label(0), False)]['method']}); B={shape.batch_size}, "
             f"T={shape.seq_len}, {args.repeats} rounds (median)")
    finish("checkpointing", args, results, text, env)


def _saved_percent(ckpt_over_plain: float | None) -> float | None:
    return None if ckpt_over_plain is None else 100 * (1 - ckpt_over_plain)


if __name__ == "__main__":
    main()
