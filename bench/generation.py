"""Generation throughput with and without the KV cache (issue 7, item 4).

``FreeTransformer.generate`` with ``use_cache=True`` vs ``use_cache=False`` (the whole
prefix recomputed at every new token, with the same Z per position), 256 new tokens
after a short prompt, for the baseline and the Free Transformer (H = 16), at the model
of item 1 with ``max_seq_len`` raised to hold prompt + new tokens.  Rounds interleave the
four runs; speedup = uncached time / cached time of the same round, median over rounds.
Target: speedup >= 5x.

    python bench/generation.py --json bench/results/generation.json
"""

from __future__ import annotations

import torch
from common import (
    CPU_SHAPE,
    TINY_SHAPE,
    environment,
    finish,
    interleaved,
    label,
    latent,
    median,
    parser,
    setup,
    table,
)

from freetf import FreeTransformer, load_config

H_VALUES = (0, 16)
TARGET_SPEEDUP = 5.0


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--new-tokens", type=int, default=None, help="default: 256 (tiny: 16)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args()
    setup(args)
    env = environment()
    shape = TINY_SHAPE if args.tiny else CPU_SHAPE
    new = args.new_tokens or (16 if args.tiny else 256)
    total_len = args.prompt_len + new
    gen = torch.Generator().manual_seed(0)
    fns = {}
    for h in H_VALUES:
        cfg = load_config(overrides=[*shape.overrides, *latent(h),
                                     f"model.max_seq_len={total_len}",
                                     f"data.max_seq_len={total_len}"])
        torch.manual_seed(0)
        model = FreeTransformer(cfg.model).eval()
        prompt = torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.prompt_len),
                               generator=gen)
        for use_cache in (True, False):
            fns[f"{label(h)}/{'cached' if use_cache else 'uncached'}"] = (
                lambda m=model, pr=prompt, c=use_cache: _generate(m, pr, new, c))
    rounds = interleaved(fns, args.repeats, args.warmup)

    results = {"rounds_s": rounds, "new_tokens": new, "prompt_len": args.prompt_len,
               "batch_size": args.batch_size, "overrides": list(shape.overrides),
               "configs": {}}
    rows = []
    for h in H_VALUES:
        name = label(h)
        cached, uncached = f"{name}/cached", f"{name}/uncached"
        res = {
            "cached_tokens_per_s": median([args.batch_size * new / r[cached] for r in rounds]),
            "uncached_tokens_per_s": median([args.batch_size * new / r[uncached]
                                             for r in rounds]),
            "speedup": median([r[uncached] / r[cached] for r in rounds]),
        }
        res["target_holds"] = res["speedup"] >= TARGET_SPEEDUP
        results["configs"][name] = res
        rows.append([name, res["cached_tokens_per_s"], res["uncached_tokens_per_s"],
                     res["speedup"], "holds" if res["target_holds"] else "FAILS"])
    text = table(["config", "cached tok/s", "uncached tok/s", "speedup",
                  f">= {TARGET_SPEEDUP:.0f}x"], rows)
    text += (f"\n{new} new tokens after a {args.prompt_len}-token prompt, batch "
             f"{args.batch_size}, {args.repeats} rounds (median)")
    finish("generation", args, results, text, env)


def _generate(model: FreeTransformer, prompt: torch.Tensor, new: int, use_cache: bool
              ) -> torch.Tensor:
    torch.manual_seed(0)  # the same samples on both paths
    return model.generate(prompt, new, temperature=1.0, use_cache=use_cache)


if __name__ == "__main__":
    main()
