"""The optimizer and the AMP dtype of a run: AdamW's parameter groups, fused or foreach."""

from __future__ import annotations

import torch

from freetf.config import Config


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA by default, off on CPU (no native bf16 there); fp16 on request."""
    amp = cfg.training.amp
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device):
    """AdamW with the guide's betas/eps; no weight decay on norms, biases and zeta.

    With ``optimizer.post_sampler_lr_mult`` != 1 the post-sampler (``mapper.weight`` and
    ``mapper.bias``) gets its own groups at that multiple of the learning rate.
    """
    lr, mult = cfg.training.learning_rate, cfg.optimizer.post_sampler_lr_mult
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            special = mult != 1.0 and _is_post_sampler(name)
            groups.setdefault((special, p.dim() >= 2), []).append(p)
    param_groups = [{"params": groups[key], "lr": lr * (mult if key[0] else 1.0),
                     "weight_decay": cfg.training.weight_decay if key[1] else 0.0}
                    for key in ((False, True), (False, False), (True, True), (True, False))
                    if key in groups]
    impl = cfg.optimizer.fused
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(param_groups, lr=lr, betas=cfg.optimizer.betas,
                             eps=cfg.optimizer.eps, **kwargs)


def _is_post_sampler(name: str) -> bool:
    """``mapper.weight``/``mapper.bias``, also under a DDP/FSDP/compile wrapper's prefix."""
    return name.split(".")[-2:-1] == ["mapper"]
