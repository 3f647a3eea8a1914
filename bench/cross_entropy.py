"""The LM head + cross-entropy alone: plain vs chunked (``training.cross_entropy``).

The plain path materialises the (N, V) logits in the compute dtype and again in fp32
(the upcast), and autograd keeps them for backward; the chunked path holds one chunk.
Measured on N = B T tokens at hidden size D and vocabulary V (default: the ~125M GPU
shape's head, D = 768, V = 32000, N = 4096 on CPU, 16 x 1024 on CUDA):

- forward + backward time (interleaved rounds, median);
- bytes autograd saves for backward (deterministic);
- on CUDA, the peak memory allocated during the step beyond what was held before;
- the loss and both gradients of the chunked path against the plain one (max abs error).

    python bench/cross_entropy.py --json bench/results/cross_entropy.json
"""

from __future__ import annotations

import torch
from common import (
    environment,
    finish,
    interleaved,
    median,
    parser,
    saved_activation_bytes,
    setup,
    synchronize,
    table,
)

from freetf.model.losses import chunked_linear_cross_entropy, reconstruction_loss

MiB = 2**20


def main() -> None:
    p = parser(__doc__.splitlines()[0], repeats=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--tokens", type=int, default=None, help="N = B x T")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-tokens", type=int, default=0, help="0: sized automatically")
    args = p.parse_args()
    setup(args)
    env = environment()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else None  # CPU: fp32 (no native bf16)
    n = args.tokens or (16 * 1024 if device.type == "cuda" else 4096)
    d, v = args.hidden, args.vocab
    if args.tiny:
        n, d, v = 64, 32, 512
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) / d**0.5).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)

    def loss(impl: str) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if impl == "chunked":
                return chunked_linear_cross_entropy(hidden, weight, targets, args.chunk_tokens)
            return reconstruction_loss(torch.nn.functional.linear(hidden, weight), targets)

    def step(impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden.grad = weight.grad = None
        value = loss(impl)
        value.backward()
        return value.detach(), hidden.grad, weight.grad

    results: dict = {"tokens": n, "hidden": d, "vocab": v, "device": device.type,
                     "dtype": str(dtype or torch.float32), "configs": {}}
    ref = step("plain")
    rounds = interleaved({impl: (lambda i=impl: step(i)) for impl in ("plain", "chunked")},
                         args.repeats, args.warmup, device)
    rows = []
    for impl in ("plain", "chunked"):
        out = step(impl)
        res = {"step_s": median([r[impl] for r in rounds]),
               "saved_mib": saved_activation_bytes(lambda i=impl: loss(i), torch.nn.Linear(1, 1))
               / MiB,
               "loss_abs_err": (out[0] - ref[0]).abs().item(),
               "grad_hidden_max_err": (out[1] - ref[1]).abs().max().item(),
               "grad_weight_max_err": (out[2] - ref[2]).abs().max().item()}
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
            step(impl)
            res["peak_mib"] = (torch.cuda.max_memory_allocated() - held) / MiB
        results["configs"][impl] = res
        rows.append([impl, 1e3 * res["step_s"], res["saved_mib"], res.get("peak_mib"),
                     res["loss_abs_err"], res["grad_weight_max_err"]])
    plain, chunked = results["configs"]["plain"], results["configs"]["chunked"]
    results["time_ratio_chunked_over_plain"] = chunked["step_s"] / plain["step_s"]
    text = table(["config", "fwd+bwd ms", "saved MiB", "peak MiB", "loss err",
                  "dW max err"], rows)
    text += (f"\nN={n} tokens, D={d}, V={v}, {device.type} {results['dtype']}, "
             f"{args.repeats} rounds; chunked/plain time "
             f"{results['time_ratio_chunked_over_plain']:.2f}")
    finish("cross_entropy", args, results, text, env)


if __name__ == "__main__":
    main()
