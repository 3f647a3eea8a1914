"""Data parallelism applied from outside the model: FSDP2 sharding, gradient sync, clipping.

``scaling.strategy=fsdp`` shards the model with ``torch.distributed.fsdp.fully_shard``
(FSDP2), the way torchtitan does: each transformer block, the encoder block and the
post-sampler (the binary mapper, whose exact form holds a (2^H, D) table) become their
own FSDP units, then the root takes the rest (embeddings, tied LM head, norms, zeta,
the encoder's read-out).  Each worker then holds 1/N of the parameters, gradients and
AdamW state; a unit's parameters are all-gathered for its forward and backward, and its
gradients reduce-scattered (averaged, as DDP's all-reduce does).

The model code knows nothing of this: a runner's context calls :func:`apply_fsdp` on the
built model before the optimizer sees its parameters (``TrainContext.shard_model``); the
loop uses the helpers below, which are no-ops on a plain or DDP model.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from freetf.config import Config


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The sub-modules sharded as units of their own, in forward order (not the root)."""
    units: list[nn.Module] = list(model.blocks)
    if getattr(model, "encoder", None) is not None:
        units += [model.encoder, model.mapper]
    return units


def mixed_precision(cfg: Config, device: torch.device):
    """FSDP2's policy: parameters gathered and computed in the AMP dtype on CUDA, gradients
    reduced in fp32 (the sharded fp32 parameters stay the optimizer's master weights).
    None (everything fp32) when AMP is off or on CPU."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from freetf.training.optim import amp_dtype

    dtype = amp_dtype(cfg, device)
    if dtype is None or device.type != "cuda":
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def apply_fsdp(model: nn.Module, cfg: Config, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over the default process group.  -> ``model``.

    Call it on every rank with identical weights (the loop seeds them alike), before the
    optimizer is built: the parameters become DTensors holding this rank's shard.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs = {}
    policy = mixed_precision(cfg, device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    if cfg.scaling.fsdp_cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    # FSDP2 warns when a unit returns a view (an in-place op on it would skip its hooks);
    # the model never modifies a unit's output in place (x + r, not x += r).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
    for unit in fsdp_units(model):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)  # the root: FSDP2 keeps its parameters gathered after forward
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Is ``model`` (or the module ``torch.compile`` wraps) sharded with FSDP2?"""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients in this backward (``enabled``) or only accumulate them locally.

    DDP: ``no_sync()``.  FSDP2: ``set_requires_gradient_sync(False)`` (no reduce-scatter;
    unsharded gradients accumulate until the last micro-batch's backward reduces them).
    A plain model: nothing to do.
    """
    inner = getattr(model, "_orig_mod", model)
    if enabled:
        yield
    elif is_fsdp(inner):
        inner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            inner.set_requires_gradient_sync(True)
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` whose result is the global norm as a plain 0-dim tensor.

    On sharded (DTensor) gradients torch computes the norm over every shard (a partial
    norm reduced across ranks) and clips with it; the norm it returns is a DTensor,
    made a plain tensor here so the loop can log it and test it for finiteness.
    """
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(list(parameters),
                                          max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


@contextlib.contextmanager
def unsharded(model: nn.Module) -> Iterator[None]:
    """Gather an FSDP2 model's parameters for the block (every rank must enter it).

    Evaluation and generation call the model outside its ``forward`` (``generate``, the
    post-sampler's ``embed_codes``), and rank 0 alone decodes samples: with every unit
    gathered and told not to reshard after forward, any rank may run any method with no
    collective.  Costs one full copy of the parameters per rank (in the compute dtype)
    while it lasts.  A plain or DDP model: nothing to do.
    """
    if not is_fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    inner = getattr(model, "_orig_mod", model)
    units = [m for m in inner.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            # back to apply_fsdp's choice: units reshard after forward, the root does not
            unit.set_reshard_after_forward(unit is not inner, recurse=False)
