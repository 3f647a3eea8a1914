"""``freetf plan``: the memory a config needs per GPU under DDP and FSDP, before launching.

Counted from the model built on the meta device (exact parameter counts, no memory) and
the config's batch, sequence length and precision.  Per GPU, for N workers:

- parameters, fp32 (the optimizer's master weights): 4 P bytes; FSDP: 4 P / N
- gradients, fp32: 4 P; FSDP: 4 P / N
- AdamW state (exp_avg, exp_avg_sq), fp32: 8 P; FSDP: 8 P / N
- FSDP's gathered units: the largest unit's parameters in the compute dtype, twice (the
  unit running and the next one prefetched), plus its unsharded fp32 gradient
- activations saved for backward, an estimate (below), with and without
  ``training.gradient_checkpointing``

Activations, per token, in the compute dtype e (2 bytes under bf16 AMP, else 4), with
D the width, D_kv the keys' and values' width, F the SwiGLU width, V the vocabulary:

- a block (decoder or encoder): (5 D + 2 D_kv + 4 F) e: the two norms' inputs and
  outputs, q, k, v and the attention output (SDPA keeps no T x T scores), the SwiGLU's
  three F-wide inputs and the product;
- the embeddings' output: D e; the logits and the fp32 cross-entropy: V (e + 8), or with
  ``training.cross_entropy=chunked`` D e per token plus the (V, D) fp32 LM-head gradient;
- the exact mapper's dense reference (``model.mapper_impl=dense``): 2^H x 4 x 2 per token
  (G and its product); the chunked one keeps the H logits only.

With gradient checkpointing a block keeps only its input (D e per token) and one block's
activations are alive again during its recomputation.  Left out: DDP's gradient buckets,
the allocator's fragmentation, CUDA context and NCCL buffers (budget 2-4 GiB per GPU),
and temporaries of the attention and optimizer kernels.  With ``scaling.fsdp_cpu_offload``
the parameters, gradients and AdamW state rows live in host memory instead; the plan
does not move them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from freetf.config import Config

GIB = 1024 ** 3
STRATEGIES = ("ddp", "fsdp")
ROWS = ("parameters (fp32)", "gradients (fp32)", "AdamW state (fp32)", "gathered FSDP units",
        "activations", "activations (checkpointed)")


@dataclass(frozen=True)
class ModelCounts:
    total: int  # parameters, tied embeddings once
    largest_unit: int  # parameters of the largest FSDP unit (a block, the mapper, the root)


@dataclass(frozen=True)
class MemoryPlan:
    strategy: str
    num_workers: int
    parameters: int
    rows: dict[str, float]  # bytes per GPU

    @property
    def total(self) -> float:
        """Peak estimate without gradient checkpointing."""
        return sum(v for k, v in self.rows.items() if k != "activations (checkpointed)")

    @property
    def total_checkpointed(self) -> float:
        return sum(v for k, v in self.rows.items() if k != "activations")


def count_parameters(cfg: Config) -> ModelCounts:
    """Exact counts from the model built on the meta device."""
    from freetf.model.transformer import FreeTransformer
    from freetf.training.parallel import fsdp_units

    with torch.device("meta"):
        model = FreeTransformer(cfg.model)
    total = model.num_parameters()["total"]
    units = [sum(p.numel() for p in unit.parameters()) for unit in fsdp_units(model)]
    root = total - sum(units)
    return ModelCounts(total, max([root, *units]))


def compute_bytes(cfg: Config) -> int:
    """Bytes of one activation: the AMP dtype on a GPU (bf16 by default), else fp32."""
    return 4 if cfg.training.amp == "off" else 2


def activation_bytes(cfg: Config, checkpointed: bool) -> float:
    """Activations saved for backward by one worker's micro-batch (see the module doc)."""
    m, e = cfg.model, compute_bytes(cfg)
    tokens = cfg.training.batch_size * cfg.data.max_seq_len
    block = (5 * m.hidden_dim + 2 * m.kv_heads * m.head_dim + 4 * m.ffn_dim) * e
    blocks = m.num_layers + (1 if m.has_latent else 0)  # + the encoder block
    per_token = m.hidden_dim * e  # the embeddings' output
    if checkpointed:
        per_token += blocks * m.hidden_dim * e + block  # inputs kept, one block recomputed
    else:
        per_token += blocks * block
    if m.has_latent and m.mapper == "exact" and m.mapper_impl == "dense":
        per_token += 2 ** m.latent_dim * 4 * 2
    fixed = 0.0
    if cfg.training.cross_entropy == "chunked":
        per_token += m.hidden_dim * e
        fixed = m.vocab_size * m.hidden_dim * 4
    else:
        per_token += m.vocab_size * (e + 8)
    return tokens * per_token + fixed


def memory_plan(cfg: Config, num_workers: int, strategy: str,
                counts: ModelCounts | None = None) -> MemoryPlan:
    """Bytes per GPU of each part for ``strategy`` over ``num_workers`` workers."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    counts = counts or count_parameters(cfg)
    shards = num_workers if strategy == "fsdp" else 1
    p = counts.total
    rows = {"parameters (fp32)": 4 * p / shards, "gradients (fp32)": 4 * p / shards,
            "AdamW state (fp32)": 8 * p / shards}
    if strategy == "fsdp":
        rows["gathered FSDP units"] = counts.largest_unit * (2 * compute_bytes(cfg) + 4)
    rows["activations"] = activation_bytes(cfg, checkpointed=False)
    rows["activations (checkpointed)"] = activation_bytes(cfg, checkpointed=True)
    return MemoryPlan(strategy, num_workers, p, rows)


def format_plan(cfg: Config, plans: list[MemoryPlan], gpu_gib: float | None = None) -> str:
    """The plans side by side, in GiB per GPU."""
    m = cfg.model
    lines = [f"{plans[0].parameters / 1e9:.3g}B parameters ({m.num_layers} blocks, D="
             f"{m.hidden_dim}, H={m.latent_dim}); per worker: batch {cfg.training.batch_size}"
             f" x {cfg.data.max_seq_len} tokens, activations in "
             f"{'fp32' if compute_bytes(cfg) == 4 else 'bf16'}",
             "GiB per GPU".ljust(30) + "".join(
                 f"{p.strategy} x{p.num_workers}".rjust(12) for p in plans)]
    names = [name for name in ROWS if any(name in p.rows for p in plans)]
    for name in names:
        lines.append(name.ljust(30) + "".join(
            (f"{p.rows[name] / GIB:12.2f}" if name in p.rows else "-".rjust(12))
            for p in plans))
    lines.append("total".ljust(30) + "".join(f"{p.total / GIB:12.2f}" for p in plans))
    lines.append("total, checkpointed".ljust(30) + "".join(
        f"{p.total_checkpointed / GIB:12.2f}" for p in plans))
    if gpu_gib:
        def verdict(p: MemoryPlan) -> str:
            if p.total <= gpu_gib * GIB:
                return "yes"
            return "ckpt" if p.total_checkpointed <= gpu_gib * GIB else "no"
        lines.append(f"fits {gpu_gib:g} GiB".ljust(30)
                     + "".join(verdict(p).rjust(12) for p in plans))
    return "\n".join(lines)
