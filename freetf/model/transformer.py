"""The Free Transformer (Fleuret 2025, §3.2, Algorithm 2) and its baseline decoder.

Llama-style blocks (RMSNorm, RoPE, SwiGLU, grouped-query attention through
``F.scaled_dot_product_attention``).  The first ``B/2`` blocks are causal; a non-causal
encoder block with a learned query zeta reads their output and emits H bit logits per
token; the binary mapper turns them into a code Z_t whose embedding r_t enters the keys
and values of block ``B/2 + 1`` only.  ``latent_dim = 0`` is the baseline: the same
decoder with no encoder, mapper or injection.  ``save_pretrained`` / ``from_pretrained``
(:mod:`freetf.model.pretrained`) write and read a folder of safetensors and JSON.

This module imports only torch: no Ray, MLflow or torch.distributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from freetf.config import ModelConfig
from freetf.model.mapper import BinaryMapper
from freetf.model.pretrained import PretrainedMixin


class RotaryEmbedding(nn.Module):
    """RoPE tables, built once for ``max_seq_len`` positions (not per step).

    The pair (x_2i, x_2i+1) is rotated by angle pos * theta^(-2i/hd): as a complex
    number, x_2i + j x_2i+1 times e^(j angle).  One complex multiply on a view of x,
    instead of strided slices and a stack (2x faster forward + backward on CPU).

    The complex64 table is a plain attribute, not a buffer: ``model.to(torch.bfloat16)``
    (or an FSDP mixed-precision cast) would turn a complex buffer into its real part and
    silently break positions.  It follows x to its device on first use.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(max_seq_len).float(), inv_freq)  # (T, hd/2)
        self.rotation = torch.polar(torch.ones_like(angles), angles)  # (T, hd/2) e^(j angle)

    def _apply(self, fn, recurse=True):
        """Follow ``.to(device)`` / ``.cuda()`` (probed on an empty tensor), never a dtype."""
        device = fn(torch.empty(0, device=self.rotation.device)).device
        self.rotation = self.rotation.to(device)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Rotate x: (B, heads, T, hd) at positions start.., in fp32, back to x's dtype."""
        t = x.shape[-2]
        if start + t > self.rotation.shape[0]:
            raise ValueError(f"sequence position {start + t} exceeds max_seq_len "
                             f"{self.rotation.shape[0]}")
        if self.rotation.device != x.device:
            self.rotation = self.rotation.to(x.device)
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, h, T, hd/2)
        rotated = torch.view_as_real(pairs * self.rotation[start:start + t])  # (..., hd/2, 2)
        return rotated.flatten(-2).to(x.dtype)


class KVCache:
    """Per-block key/value cache for incremental decoding, preallocated.

    The buffers (B, kv_heads, capacity, hd) are allocated on the first append and
    written in place; ``append`` returns views of the filled part.  (Growing the cache
    with ``torch.cat`` would re-copy it at every token: O(T^2) memory traffic.)
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (B, kv_h, T, hd) at positions length.. ; -> keys, values so far."""
        end = self.length + k.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache full: {end} positions > capacity {self.capacity}")
        if self.k is None:
            shape = (*k.shape[:-2], self.capacity, k.shape[-1])
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        self.k[..., self.length:end, :] = k
        self.v[..., self.length:end, :] = v
        self.length = end
        return self.k[..., :end, :], self.v[..., :end, :]  # (B, kv_h, end, hd)


class Attention(nn.Module):
    """Grouped-query attention with separate query and key/value inputs."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_dim, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_dim, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor, rope: RotaryEmbedding,
                causal: bool, cache: KVCache | None = None) -> torch.Tensor:
        b, tq, _ = x_q.shape
        start = cache.length if cache is not None else 0
        q = self.wq(x_q).view(b, tq, self.heads, self.head_dim).transpose(1, 2)  # (B, h, Tq, hd)
        k = self.wk(x_kv).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x_kv).view(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, start), rope(k, start)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, kv_h, start + T, hd)
        # A causal flag, never a dense mask: with a cache, a single new query sees all
        # keys; a prefill (start == 0) is the plain causal case.
        is_causal = causal and tq > 1
        if is_causal and start > 0:
            raise NotImplementedError("multi-token append to a non-empty KV cache")
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.heads)  # (B, h, Tq, hd)
        return self.wo(out.transpose(1, 2).reshape(b, tq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.hidden_dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block taking separate query and key/value streams.

    ``x = x_q + attn(norm(x_q), norm(x_kv)); x = x + ffn(norm(x))``.  With
    ``x_kv is x_q`` this is the ordinary decoder block.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps)
        self.ffn = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor | None, rope: RotaryEmbedding,
                causal: bool = True, cache: KVCache | None = None) -> torch.Tensor:
        h_q = self.attn_norm(x_q)
        h_kv = h_q if x_kv is None else self.attn_norm(x_kv)
        x = x_q + self.drop(self.attn(h_q, h_kv, rope, causal, cache))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# forward's modes: where Z comes from (the guide's names, and the same said plainly)
_Z_FROM = {"training": "posterior", "posterior": "posterior",
           "inference": "prior", "prior": "prior"}


class FreeTransformer(PretrainedMixin, nn.Module):
    """Decoder conditioned on a per-token binary latent Z (Algorithm 2).

    ``forward(input_ids, mode="training")`` returns ``(logits, z_logits)``: in training
    mode Z is sampled from the encoder's posterior; in ``"inference"`` mode from the
    uniform prior (``z_logits`` is None).  The modes say where Z comes from, so they may
    be named so: ``mode="posterior"`` is ``"training"``, ``mode="prior"`` is
    ``"inference"`` (the guide's names stay the default).  An explicit ``z`` (code
    indices, (B, T) or broadcastable) conditions on a chosen Z in either mode.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_dim)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        if cfg.has_latent:
            self.zeta = nn.Parameter(torch.empty(cfg.hidden_dim))  # learned encoder query
            self.encoder = Block(cfg)
            self.encoder_norm = nn.RMSNorm(cfg.hidden_dim, eps=cfg.norm_eps)
            self.encoder_readout = nn.Linear(cfg.hidden_dim, cfg.latent_dim)
            self.mapper = BinaryMapper(cfg.latent_dim, cfg.hidden_dim, cfg.mapper,
                                       cfg.mapper_impl, cfg.mapper_chunk_size,
                                       cfg.mapper_score_precision, cfg.post_sampler_init,
                                       cfg.post_sampler_init_std)
        self.gradient_checkpointing = False
        self._init_weights()

    # ------------------------------------------------------------------ setup

    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.startswith("mapper."):
                continue  # BinaryMapper initialises itself
            if name == "encoder_readout.weight" and self.config.readout_init_std is not None:
                nn.init.normal_(p, std=self.config.readout_init_std)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=std / (2 * self.config.num_layers) ** 0.5)
            elif p.dim() >= 2 or name in ("embed.weight", "zeta"):
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def gradient_checkpointing_enable(self) -> None:
        """Recompute block activations in backward (``torch.utils.checkpoint``)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def num_parameters(self) -> dict[str, int]:
        """Parameter counts by part (tied embeddings counted once)."""
        counts: dict[str, int] = {}
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            top = name.split(".")[0]
            part = {"embed": "embedding", "lm_head": "embedding", "blocks": "decoder",
                    "norm": "decoder", "mapper": "mapper"}.get(top, "encoder")
            counts[part] = counts.get(part, 0) + p.numel()
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ forward

    def _block(self, block: Block, x_q, x_kv, causal: bool, cache: KVCache | None):
        if self.gradient_checkpointing and self.training and cache is None:
            return checkpoint(block, x_q, x_kv, self.rope, causal, use_reentrant=False)
        return block(x_q, x_kv, self.rope, causal, cache)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Non-causal encoder block, query = zeta at every position.  (B, T, D) -> (B, T, H)."""
        zeta = self.zeta.to(x.dtype).expand_as(x)  # (B, T, D)
        y = self._block(self.encoder, zeta, x, causal=False, cache=None)
        return self.encoder_readout(self.encoder_norm(y))

    def forward_codes(self, input_ids: torch.Tensor, z: torch.Tensor | None = None,
                      sample: str = "posterior", bit_noise: torch.Tensor | None = None,
                      caches: list[KVCache] | None = None, return_hidden: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Core pass.  Returns ``(logits, z_logits, codes)``.

        ``z`` given: condition on it.  Else ``sample="posterior"`` runs the encoder on the
        first half's output; ``"prior"`` draws codes uniformly.  With ``caches`` the pass
        appends to the per-block KV caches (prefill or one decoding step).
        ``return_hidden`` returns the final normed hidden states (B, T, D) in place of the
        logits, for a loss that applies ``lm_head`` itself (the chunked cross-entropy).
        """
        cfg = self.config
        b, t = input_ids.shape
        x = self.embed(input_ids)  # (B, T, D)
        cache = (lambda i: caches[i]) if caches is not None else (lambda i: None)
        for i in range(cfg.encoder_after):
            x = self._block(self.blocks[i], x, None, True, cache(i))
        z_logits = codes = None
        if cfg.has_latent:
            if z is not None:
                codes = torch.as_tensor(z, device=x.device).long().expand(b, t)
                r = self.mapper.embed_codes(codes)
            elif sample == "posterior":
                z_logits = self.encode(x)  # (B, T, H)
                r, codes = self.mapper(z_logits, bit_noise)
            else:
                codes = self.mapper.sample_prior((b, t), x.device)
                r = self.mapper.embed_codes(codes)
            # Only block B/2+1 sees r, and only in its keys/values; the stream stays x.
            x = self._block(self.blocks[cfg.encoder_after], x, x + r.to(x.dtype), True,
                            cache(cfg.encoder_after))
            rest = range(cfg.encoder_after + 1, cfg.num_layers)
        else:
            rest = range(cfg.encoder_after, cfg.num_layers)
        for i in rest:
            x = self._block(self.blocks[i], x, None, True, cache(i))
        x = self.norm(x)  # (B, T, D)
        if return_hidden:
            return x, z_logits, codes
        return self.lm_head(x), z_logits, codes  # (B, T, V)

    def forward(self, input_ids: torch.Tensor, mode: str = "training",
                z: torch.Tensor | None = None, bit_noise: torch.Tensor | None = None,
                return_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits (B, T, V), z_logits (B, T, H) or None)``; with ``return_hidden`` the
        final normed hidden states (B, T, D) stand in for the logits."""
        sample = _Z_FROM.get(mode)
        if sample is None:
            raise ValueError(f"mode must be 'training' (or 'posterior') or 'inference' (or "
                             f"'prior'), got {mode!r}")
        logits, z_logits, _ = self.forward_codes(input_ids, z, sample, bit_noise,
                                                 return_hidden=return_hidden)
        return logits, z_logits

    # ------------------------------------------------------------------ generation

    def generate(self, prompt: torch.Tensor | list[int], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, z: torch.Tensor | int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Sample a continuation.  prompt (B, T0) or (T0,) -> (B, T0 + max_new_tokens).

        The prompt's Z comes from the encoder (prefill), each new token's Z from the
        uniform prior, unless ``z`` is given (T = T0 + max_new_tokens): a code; (B, 1),
        one code per sequence at every position; (T,) or (1, T), one code per position
        shared by every sequence (the paper's Figure 4); or (B, T).  A 1-D z must have
        length T; anything else raises ``ValueError`` (see ``_codes_per_position``).
        ``temperature = 0`` is greedy.  ``use_cache=False`` recomputes the whole prefix
        each step with the same Z per position; with the same seed both paths agree.
        Decoding runs under ``torch.inference_mode`` (less per-op bookkeeping than
        ``no_grad``, ~8% at batch 1 on CPU); the returned ids are an ordinary tensor.
        """
        with torch.inference_mode():
            ids = self._generate(prompt, max_new_tokens, temperature, top_k, top_p, z, use_cache)
        return ids.clone()  # outside inference mode: usable anywhere, autograd included

    def _generate(self, prompt, max_new_tokens, temperature, top_k, top_p, z, use_cache
                  ) -> torch.Tensor:
        ids = torch.as_tensor(prompt, device=self.embed.weight.device).long()
        ids = ids[None] if ids.dim() == 1 else ids
        b, t0 = ids.shape
        if t0 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({t0}) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_seq_len {self.config.max_seq_len}")
        z_all = None if z is None else _codes_per_position(z, b, t0 + max_new_tokens, ids.device)
        caches = ([KVCache(t0 + max_new_tokens) for _ in self.blocks] if use_cache
                  else None)
        prompt_z = None if z_all is None else z_all[:, :t0]
        logits, _, codes = self.forward_codes(ids, prompt_z, "posterior", None, caches)
        out = [ids]
        for step in range(max_new_tokens):
            nxt = _sample_next(logits[:, -1], temperature, top_k, top_p)  # (B, 1)
            out.append(nxt)
            if step == max_new_tokens - 1:
                break
            new_code = None
            if self.config.has_latent:  # the code of nxt, the token at position t0 + step
                pos = t0 + step
                new_code = z_all[:, pos:pos + 1] if z_all is not None else \
                    self.mapper.sample_prior((b, 1), ids.device)
                codes = torch.cat([codes, new_code], dim=1)
            if use_cache:
                logits, _, _ = self.forward_codes(nxt, new_code, caches=caches)
            else:
                logits, _, _ = self.forward_codes(torch.cat(out, dim=1), codes)
        return torch.cat(out, dim=1)


def _codes_per_position(z: torch.Tensor | int, batch: int, length: int,
                        device: torch.device) -> torch.Tensor:
    """The accepted shapes of ``generate``'s ``z`` -> (B, T) int64, T = prompt + new tokens.

    - a code (int or 0-dim): every position of every sequence;
    - (B, 1): one code per sequence, at every position;
    - (T,) or (1, T): one code per position, shared by every sequence (Figure 4);
    - (B, T): a code per sequence and position.

    A 1-D z is always per position: a length other than T is refused (per-sequence codes
    are (B, 1)), so a (B,) vector is never read one way or the other by its length.
    """
    z = torch.as_tensor(z, device=device).long()
    accepted = (f"a code, (B, 1) = ({batch}, 1) codes per sequence, (T,) = ({length},) or "
                f"(1, T) codes per position, or (B, T) = ({batch}, {length}); "
                f"T = prompt + max_new_tokens")
    if z.dim() == 1 and z.shape[0] != length:
        raise ValueError(f"z of shape {tuple(z.shape)} is not (T,) = ({length},): pass "
                         f"per-sequence codes as (B, 1) = ({batch}, 1). Accepted: {accepted}")
    if z.dim() == 1:
        z = z[None]  # (1, T)
    if z.dim() > 2 or (z.dim() == 2 and (z.shape[0] not in (1, batch)
                                         or z.shape[1] not in (1, length))):
        raise ValueError(f"z of shape {tuple(z.shape)} is not accepted: {accepted}")
    return z.expand(batch, length)


def _sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                 top_p: float | None) -> torch.Tensor:
    """(B, V) -> (B, 1).  Greedy at temperature 0; else top-k / nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1)
