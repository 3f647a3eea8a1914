"""FreeTransformer: Algorithm 2 structure, baseline equivalence, KV-cache generation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from freetf import FreeTransformer
from freetf.model.transformer import Block, KVCache, RotaryEmbedding

pytestmark = pytest.mark.timeout(120)


def test_shapes_and_dtypes(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg)
    ids = torch.randint(0, 32, (3, 10))
    logits, z_logits = model(ids, mode="training")
    assert logits.shape == (3, 10, 32) and logits.dtype == torch.float32
    assert z_logits.shape == (3, 10, 4)
    logits, z_logits = model(ids, mode="inference")
    assert logits.shape == (3, 10, 32) and z_logits is None
    with pytest.raises(ValueError, match="mode"):
        model(ids, mode="eval")


@pytest.mark.parametrize("guide, plain", [("training", "posterior"), ("inference", "prior")])
def test_the_modes_have_the_names_of_where_z_comes_from(tiny_model_cfg, guide, plain):
    """``posterior`` is ``training`` and ``prior`` is ``inference``: same draws, same
    logits; the two sources of Z give different logits (the test can tell them apart)."""
    model = FreeTransformer(tiny_model_cfg)
    ids = torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for mode in (guide, plain, "prior" if plain == "posterior" else "posterior"):
        torch.manual_seed(1)
        outputs[mode] = model(ids, mode=mode)
    assert torch.equal(outputs[guide][0], outputs[plain][0])
    assert (outputs[guide][1] is None) == (outputs[plain][1] is None)
    other = [m for m in outputs if m not in (guide, plain)][0]
    assert not torch.allclose(outputs[plain][0], outputs[other][0])


def test_encoder_is_position_aware(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg)
    with torch.no_grad():  # trained-size encoder weights instead of init-size ones
        for name, p in model.named_parameters():
            if name.startswith(("encoder", "zeta")) and p.dim() >= 1 and "norm" not in name:
                p.normal_(std=0.3)
    ids = torch.randint(0, 32, (1, 12))
    _, z_logits = model(ids)
    per_position = z_logits[0]  # (T, H)
    assert (per_position - per_position[:1]).abs().amax(-1)[1:].min() > 1e-4


def _capture_block_inputs(model, ids, z):
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, o: seen.append((a[0].clone(), o.clone())))
             for b in model.blocks]
    with torch.no_grad():
        logits, _ = model(ids, z=z)
    for h in hooks:
        h.remove()
    return seen, logits


def test_only_block_after_half_receives_the_latent(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg).eval()
    ids = torch.randint(0, 32, (2, 9))
    a, logits_a = _capture_block_inputs(model, ids, torch.zeros(2, 9, dtype=torch.long))
    b, logits_b = _capture_block_inputs(model, ids, torch.full((2, 9), 11))
    half = tiny_model_cfg.num_layers // 2
    for i in range(half):  # blocks 1..B/2 and the input of block B/2+1: identical
        assert torch.equal(a[i][1], b[i][1])
    assert torch.equal(a[half][0], b[half][0])  # the stream x entering B/2+1 is not x + r
    assert not torch.allclose(a[half][1], b[half][1], atol=1e-6)  # its output depends on Z (K/V)
    assert not torch.allclose(logits_a, logits_b, atol=1e-6)


def test_injection_layer_is_configurable(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, injection_layer=1)
    model = FreeTransformer(cfg).eval()
    ids = torch.randint(0, 32, (1, 6))
    a, _ = _capture_block_inputs(model, ids, torch.zeros(1, 6, dtype=torch.long))
    b, _ = _capture_block_inputs(model, ids, torch.ones(1, 6, dtype=torch.long))
    assert torch.equal(a[0][1], b[0][1])
    assert not torch.allclose(a[1][1], b[1][1], atol=1e-6)


def test_explicit_z_broadcasts(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg).eval()
    ids = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        l1, _ = model(ids, z=torch.tensor(7))
        l2, _ = model(ids, z=torch.full((2, 5), 7))
    assert torch.equal(l1, l2)


def _plain_decoder_logits(model: FreeTransformer, ids: torch.Tensor) -> torch.Tensor:
    """An independent Llama-style decoder written out from the equations."""
    cfg = model.config
    t = ids.shape[1]
    hd = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(t).float(), inv)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1).flatten(-2)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    x = model.embed.weight[ids]
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    for blk in model.blocks:
        h = rms(x, blk.attn_norm.weight)
        q = (h @ blk.attn.wq.weight.T).view(1, t, cfg.num_heads, hd).transpose(1, 2)
        k = (h @ blk.attn.wk.weight.T).view(1, t, cfg.kv_heads, hd).transpose(1, 2)
        v = (h @ blk.attn.wv.weight.T).view(1, t, cfg.kv_heads, hd).transpose(1, 2)
        rep = cfg.num_heads // cfg.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + ((att @ v).transpose(1, 2).reshape(1, t, -1) @ blk.attn.wo.weight.T)
        h = rms(x, blk.ffn_norm.weight)
        x = x + (F.silu(h @ blk.ffn.w1.weight.T) * (h @ blk.ffn.w3.weight.T)) @ blk.ffn.w2.weight.T
    return rms(x, model.norm.weight) @ model.embed.weight.T


def test_baseline_equals_plain_decoder(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, latent_dim=0)
    model = FreeTransformer(cfg).eval()
    assert not hasattr(model, "encoder") and not hasattr(model, "mapper")
    ids = torch.randint(0, 32, (1, 11))
    with torch.no_grad():
        logits, z_logits = model(ids)
        ref = _plain_decoder_logits(model, ids)
    assert z_logits is None
    assert torch.allclose(logits, ref, atol=1e-5)


def test_parameter_counts(tiny_model_cfg):
    ft = FreeTransformer(tiny_model_cfg)
    base = FreeTransformer(dataclasses.replace(tiny_model_cfg, latent_dim=0))
    c_ft, c_base = ft.num_parameters(), base.num_parameters()
    assert c_ft["total"] == sum(p.numel() for p in ft.parameters())
    assert c_base["total"] == sum(p.numel() for p in base.parameters())
    assert c_ft["decoder"] == c_base["decoder"] and c_ft["embedding"] == c_base["embedding"]
    d, h = tiny_model_cfg.hidden_dim, tiny_model_cfg.latent_dim
    block = sum(p.numel() for p in Block(tiny_model_cfg).parameters())
    assert c_ft["encoder"] == block + d + d + (d * h + h)  # block, zeta, norm, readout
    assert c_ft["mapper"] == 2 ** h * d + d
    assert c_ft["total"] - c_base["total"] == c_ft["encoder"] + c_ft["mapper"]
    v, layers = tiny_model_cfg.vocab_size, tiny_model_cfg.num_layers
    assert c_ft["decoder"] == layers * block + d  # the blocks and the final norm
    assert c_ft["embedding"] == v * d  # tied: counted once
    untied = FreeTransformer(dataclasses.replace(tiny_model_cfg, tie_embeddings=False))
    assert untied.num_parameters()["embedding"] == 2 * v * d
    assert untied.num_parameters()["decoder"] == c_ft["decoder"]


def test_mapper_settings_reach_the_mapper(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, mapper_impl="dense", mapper_chunk_size=128,
                              mapper_score_precision="autocast")
    mapper = FreeTransformer(cfg).mapper
    assert (mapper.impl, mapper.chunk_size, mapper.score_precision) == ("dense", 128, "autocast")


@pytest.mark.parametrize("latent_dim", [0, 4])
def test_kv_cache_generation_equals_uncached(tiny_model_cfg, latent_dim):
    cfg = dataclasses.replace(tiny_model_cfg, latent_dim=latent_dim)
    model = FreeTransformer(cfg).eval()
    prompt = torch.randint(0, 32, (3, 5))
    torch.manual_seed(1)
    cached = model.generate(prompt, 20, temperature=0)
    torch.manual_seed(1)
    uncached = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (3, 25) and cached.dtype == torch.long
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    torch.manual_seed(2)
    sampled = model.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9)
    torch.manual_seed(2)
    sampled_nc = model.generate(prompt, 20, temperature=1.0, top_k=10, top_p=0.9,
                                use_cache=False)
    assert torch.equal(sampled, sampled_nc)


def test_shared_z_generation_is_conditioned(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg).eval()
    prompt = torch.randint(0, 32, (4, 3))
    torch.manual_seed(0)
    a = model.generate(prompt, 10, temperature=0, z=3)
    torch.manual_seed(5)
    b = model.generate(prompt, 10, temperature=0, z=3)
    assert torch.equal(a, b)  # greedy with a fixed Z is deterministic
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 100)


def test_gradient_checkpointing_same_gradients(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, dropout=0.1)
    model = FreeTransformer(cfg).train()
    ids = torch.randint(0, 32, (2, 8))
    noise = torch.rand(2, 8, 4)
    torch.manual_seed(3)
    logits, z = model(ids, bit_noise=noise)
    (logits.square().mean() + z.square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *args: calls.append(1))
    model(ids, bit_noise=noise)[0].sum().backward()
    assert len(calls) == 1  # checkpointing off: no recomputation
    model.zero_grad()
    model.gradient_checkpointing_enable()
    torch.manual_seed(3)
    logits2, z2 = model(ids, bit_noise=noise)
    (logits2.square().mean() + z2.square().mean()).backward()
    assert len(calls) == 3  # the block's forward ran again in backward: it was checkpointed
    assert torch.allclose(logits, logits2, rtol=0, atol=1e-6)  # fp32, the same kernels again
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n
    model.gradient_checkpointing_disable()
    model(ids, bit_noise=noise)[0].sum().backward()
    assert len(calls) == 4  # off again: no recomputation


def test_all_parts_receive_gradients(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg)
    logits, z_logits = model(torch.randint(0, 32, (2, 7)))
    (F.cross_entropy(logits.reshape(-1, 32), torch.randint(0, 32, (14,)))
     + z_logits.sigmoid().mean()).backward()
    for name in ("zeta", "encoder_readout.weight", "mapper.weight", "blocks.0.attn.wq.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_dense_and_chunked_mapper_models_agree(tiny_model_cfg):
    torch.manual_seed(0)
    chunked = FreeTransformer(tiny_model_cfg)
    dense = FreeTransformer(dataclasses.replace(tiny_model_cfg, mapper_impl="dense"))
    dense.load_state_dict(chunked.state_dict())
    ids = torch.randint(0, 32, (2, 6))
    noise = torch.rand(2, 6, 4)
    for m in (chunked, dense):
        logits, _ = m(ids, bit_noise=noise)
        logits.square().mean().backward()
    assert torch.allclose(chunked.zeta.grad, dense.zeta.grad, atol=1e-6)


def test_per_position_shared_z_sequence(tiny_model_cfg):
    model = FreeTransformer(tiny_model_cfg).eval()
    prompt = torch.randint(0, 32, (3, 2))
    z_seq = torch.randint(0, 16, (12,))
    torch.manual_seed(0)
    a = model.generate(prompt, 10, temperature=0, z=z_seq)
    torch.manual_seed(0)
    b = model.generate(prompt, 10, temperature=0, z=z_seq, use_cache=False)
    with torch.no_grad():
        logits, _ = model(a[:, :-1], z=z_seq[None, :11].expand(3, 11))
    assert torch.equal(a, b)
    assert torch.equal(logits[:, 1:].argmax(-1), a[:, 2:])  # each token saw its own code
    with pytest.raises(ValueError, match=r"not \(T,\)"):
        model.generate(prompt, 10, z=torch.zeros(5, dtype=torch.long))


@pytest.mark.timeout(300)
def test_torch_compile_matches_eager_under_bf16_autocast(tiny_model_cfg):
    """`training.compile`: the compiled model equals eager (the chunked mapper included)."""
    model = FreeTransformer(tiny_model_cfg)
    compiled = torch.compile(model)
    ids = torch.randint(0, 32, (2, 12))
    noise = torch.rand(2, 12, 4)
    outs = []
    for m in (model, compiled):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, z = m(ids, bit_noise=noise)
            loss = logits.float().square().mean() + z.float().square().mean()
        loss.backward()
        outs.append((logits.float(), model.zeta.grad.clone()))
    assert torch.allclose(outs[0][0], outs[1][0], atol=3e-2)
    assert torch.allclose(outs[0][1], outs[1][1], rtol=0.1, atol=1e-4)


def test_rope_rotates_each_pair_by_its_position_angle():
    rope = RotaryEmbedding(head_dim=8, max_seq_len=32, theta=10000.0)
    x = torch.randn(2, 3, 5, 8)  # (B, h, T, hd) at positions 7..11
    out = rope(x, start=7)
    pos = torch.arange(7, 12).float()[:, None]
    ang = pos / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)  # (T, hd/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    assert torch.allclose(out[..., 0::2], x1 * ang.cos() - x2 * ang.sin(), atol=1e-6)
    assert torch.allclose(out[..., 1::2], x1 * ang.sin() + x2 * ang.cos(), atol=1e-6)
    assert rope(x.bfloat16(), start=7).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="sequence position 35 exceeds max_seq_len 32"):
        rope(x, start=30)
    assert torch.equal(rope(x[..., :1, :]), x[..., :1, :])  # by default from position 0
    moved = RotaryEmbedding(head_dim=8, max_seq_len=32, theta=10000.0)
    on_meta = moved(x.to("meta"), start=7)  # the table follows x to its device on first use
    assert on_meta.device.type == "meta" and on_meta.shape == x.shape
    assert moved.rotation.device.type == "meta"


def test_generated_ids_are_ordinary_tensors(tiny_model_cfg):
    """Decoding runs in inference mode; its output must still feed a training forward."""
    model = FreeTransformer(tiny_model_cfg)
    ids = model.generate(torch.randint(0, 32, (1, 3)), 4, temperature=0)
    assert not ids.is_inference()
    logits, _ = model(ids, mode="training")
    logits.sum().backward()


@pytest.mark.parametrize(("latent_dim", "cross_entropy"), [(0, "plain"), (4, "chunked")])
def test_compiled_bf16_loss_within_one_percent_of_eager_fp32(latent_dim, cross_entropy):
    """The fast path changes no result: a compiled model under bf16 autocast gives the
    eager fp32 loss on the same batch (same Z noise) to 1%, for the baseline and the Free
    Transformer, through either cross-entropy (the loop compiles the model, not the loss)."""
    from freetf import load_config
    from freetf.model.losses import HeadInputs, compute_loss

    cfg = load_config(overrides=["model.vocab_size=64", "model.hidden_dim=64",
                                 "model.num_layers=4", "model.num_heads=4",
                                 "model.num_kv_heads=2", f"model.latent_dim={latent_dim}"])
    torch.manual_seed(0)
    model = FreeTransformer(cfg.model)
    with torch.no_grad():  # weights 5x init scale: the logits, not log V, decide the loss
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    ids = torch.randint(0, 64, (4, 32))
    noise = torch.rand(4, 32, latent_dim) if latent_dim else None
    chunked = cross_entropy == "chunked"

    def loss_of(module, autocast: bool) -> float:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out, z_logits = module(ids, bit_noise=noise, return_hidden=chunked)
            logits = HeadInputs(out, model.lm_head.weight, 37) if chunked else out
            total, _ = compute_loss(logits[:, :-1],
                                    None if z_logits is None else z_logits[:, :-1],
                                    ids[:, 1:], kl_weight=1.0, free_bits_nats=0.1)
        return total.item()

    eager_fp32 = loss_of(model, autocast=False)
    assert abs(eager_fp32 - math.log(64)) > 0.2
    compiled_bf16 = loss_of(torch.compile(model), autocast=True)
    assert compiled_bf16 == pytest.approx(eager_fp32, rel=0.01)
    assert abs(compiled_bf16 - eager_fp32) > 0  # bf16 really ran (not the fp32 path twice)

def _scaled_up(cfg, std: float = 0.3, seed: int = 0) -> FreeTransformer:
    """A model at trained-size weights: positions and codes change the logits a lot."""
    torch.manual_seed(seed)
    model = FreeTransformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and "norm" not in name:
                p.normal_(std=std)
    return model.eval()


@pytest.mark.parametrize("cast", ["bfloat16", "half", "double", "to_float64", "to_cpu"])
def test_rope_survives_dtype_and_device_casts(tiny_model_cfg, cast):
    """`model.half()` / `.to(bf16)` / `.double()` must not drop RoPE's imaginary part."""
    model = _scaled_up(tiny_model_cfg)
    x = torch.randn(1, 2, 9, tiny_model_cfg.head_dim)
    reference = model.rope(x, start=3)
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        logits32, _ = model(ids, z=torch.full((2, 9), 5))
    cast_fn = {"bfloat16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
               "double": lambda m: m.double(), "to_float64": lambda m: m.to(torch.float64),
               "to_cpu": lambda m: m.to("cpu", torch.float64)}[cast]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Casting complex values to real discards ..."
        model = cast_fn(model)
    assert torch.allclose(model.rope(x, start=3), reference, atol=1e-6)
    if cast in ("double", "to_float64", "to_cpu"):  # fp64 model == fp32 model
        with torch.no_grad():
            logits64, _ = model(ids, z=torch.full((2, 9), 5))
        assert torch.allclose(logits64.float(), logits32, rtol=1e-4, atol=1e-4)


def test_rope_table_follows_device_moves_but_not_dtype_casts(tiny_model_cfg):
    """``model.to(device)`` moves the table at once (not at the next forward); a dtype
    cast leaves it where it is, complex64."""
    model = FreeTransformer(tiny_model_cfg).to("meta")
    assert model.rope.rotation.device.type == "meta"
    model.half()
    assert model.rope.rotation.device.type == "meta"
    assert model.rope.rotation.dtype == torch.complex64


def test_model_runs_on_its_device_not_the_default_device(tiny_model_cfg):
    """A CPU model under another default device (as a CUDA model under the default CPU
    device): the forward pass and generation with every kind of z give the same output."""
    model = _scaled_up(tiny_model_cfg)
    ids, prompt = torch.randint(0, 32, (2, 6)), torch.randint(0, 32, (2, 3))
    per_row = torch.tensor([[1], [9]])

    def outputs():
        torch.manual_seed(12)
        with torch.no_grad():
            logits, z_logits = model(ids)
            prior, _ = model(ids, mode="inference")
        return [logits, z_logits, prior, model.generate(prompt, 3),
                model.generate(prompt, 3, z=per_row),
                model.generate(prompt, 3, use_cache=False)]

    reference = outputs()
    with torch.device("meta"):  # tensors made without a device would land on "meta"
        moved = outputs()
    for a, b in zip(reference, moved, strict=True):
        assert b.device.type == "cpu" and torch.equal(a, b)


@pytest.mark.parametrize("mode", ["training", "inference"])
def test_return_hidden_gives_the_states_the_head_reads(tiny_model_cfg, mode):
    model = _scaled_up(tiny_model_cfg)
    ids, noise = torch.randint(0, 32, (2, 7)), torch.rand(2, 7, 4)
    with torch.no_grad():
        torch.manual_seed(14)
        logits, z_logits = model(ids, mode, bit_noise=noise)
        torch.manual_seed(14)
        hidden, z_hidden = model(ids, mode, bit_noise=noise, return_hidden=True)
    assert hidden.shape == (2, 7, tiny_model_cfg.hidden_dim)
    assert torch.allclose(model.lm_head(hidden), logits, atol=1e-6)
    assert (z_logits is None and z_hidden is None) or torch.equal(z_logits, z_hidden)


def test_generation_and_forward_codes_defaults(tiny_model_cfg):
    """Generation with gradient checkpointing enabled uses the KV cache as without it;
    forward_codes samples Z from the posterior by default."""
    model = _scaled_up(tiny_model_cfg)
    prompt, ids = torch.randint(0, 32, (2, 3)), torch.randint(0, 32, (2, 6))
    torch.manual_seed(15)
    plain = model.generate(prompt, 6)
    model.gradient_checkpointing_enable()
    torch.manual_seed(15)
    assert torch.equal(model.generate(prompt, 6), plain)
    noise = torch.rand(2, 6, 4)
    with torch.no_grad():
        logits, z_logits, codes = model.forward_codes(ids, bit_noise=noise)
        reference, z_reference = model(ids, "training", bit_noise=noise)
    assert torch.equal(logits, reference) and torch.equal(z_logits, z_reference)


def test_generate_passes_its_sampling_options_on(tiny_model_cfg):
    """top_k = 1, or a nucleus smaller than any token's probability, is greedy decoding;
    the default temperature is 1; a 1-D prompt is one sequence."""
    model = _scaled_up(tiny_model_cfg)
    prompt, z = torch.randint(0, 32, (4, 3)), torch.tensor([[5]])  # one code: no prior draws
    greedy = model.generate(prompt, 8, temperature=0, z=z)

    def sampled(**options):
        torch.manual_seed(13)
        return model.generate(prompt, 8, z=z, **options)

    assert not torch.equal(sampled(temperature=1.0), greedy)  # sampling is not greedy here
    assert torch.equal(sampled(temperature=1.0, top_k=1), greedy)
    assert torch.equal(sampled(temperature=1.0, top_p=1e-6), greedy)
    assert torch.equal(sampled(), sampled(temperature=1.0))
    one = model.generate(prompt[0].tolist(), 8, temperature=0, z=z)
    assert torch.equal(one, greedy[:1])
    with pytest.raises(ValueError, match=r"prompt \(3\) \+ max_new_tokens \(64\) exceeds"):
        model.generate(prompt, 64)


def test_generate_z_shapes_are_explicit(tiny_model_cfg):
    """z: a code, (B, 1) per sequence, (T,) or (1, T) or (B, T) per position; a 1-D z whose
    length is not T is refused, even when it equals the batch size."""
    model = _scaled_up(tiny_model_cfg)
    prompt = torch.randint(0, 32, (3, 2))
    per_row = torch.tensor([1, 7, 12])
    t = 2 + 1  # prompt + max_new_tokens: B == T, where (B,) used to mean per sequence
    with pytest.raises(ValueError, match=r"\(B, 1\)"):
        model.generate(prompt, 5, z=per_row)  # (B,) with B != T: refused
    with pytest.raises(ValueError, match="z"):
        model.generate(prompt, 1, z=torch.zeros(2, 3, dtype=torch.long))  # 2 rows != B
    with pytest.raises(ValueError, match=r"or \(B, T\) = \(3, 3\); T = prompt"):
        model.generate(prompt, 1, z=torch.zeros(3, 1, 1, dtype=torch.long))
    a = model.generate(prompt, 1, temperature=0, z=per_row[:, None])
    b = model.generate(prompt, 1, temperature=0, z=per_row[:, None].expand(3, t))
    assert torch.equal(a, b)  # (B, 1) is one code per sequence at every position
    seq = torch.tensor([3, 9, 14])
    c = model.generate(prompt, 1, temperature=0, z=seq)
    d = model.generate(prompt, 1, temperature=0, z=seq[None].expand(3, t))
    assert torch.equal(c, d)  # (T,) is per position, shared by the rows
    e = model.generate(prompt, 1, temperature=0, z=per_row)  # B == T: still per position
    assert torch.equal(e, model.generate(prompt, 1, temperature=0, z=per_row[None]))


# ------------------------------------------------ behaviour against references (Algorithm 2)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope_ref(x, positions, cfg):
    hd = cfg.head_dim
    ang = positions.float()[:, None] / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()),
                       -1).flatten(-2)


def _block_ref(blk, x_q, x_kv, cfg, causal=True):
    """Pre-norm block: x = x_q + attn(norm(x_q) -> q, norm(x_kv) -> k, v); x + ffn(norm(x))."""
    b, t, _ = x_q.shape
    hd, pos = cfg.head_dim, torch.arange(t)
    hq, hkv = _rms(x_q, blk.attn_norm.weight, cfg.norm_eps), _rms(x_kv, blk.attn_norm.weight,
                                                                  cfg.norm_eps)
    q = (hq @ blk.attn.wq.weight.T).view(b, t, cfg.num_heads, hd).transpose(1, 2)
    k = (hkv @ blk.attn.wk.weight.T).view(b, t, cfg.kv_heads, hd).transpose(1, 2)
    v = (hkv @ blk.attn.wv.weight.T).view(b, t, cfg.kv_heads, hd).transpose(1, 2)
    rep = cfg.num_heads // cfg.kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    att = _rope_ref(q, pos, cfg) @ _rope_ref(k, pos, cfg).transpose(-1, -2) / math.sqrt(hd)
    if causal:
        att = att.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), float("-inf"))
    x = x_q + (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1) @ blk.attn.wo.weight.T
    h = _rms(x, blk.ffn_norm.weight, cfg.norm_eps)
    return x + (F.silu(h @ blk.ffn.w1.weight.T) * (h @ blk.ffn.w3.weight.T)) @ blk.ffn.w2.weight.T


def _free_transformer_ref(model, ids, codes=None):
    """Algorithm 2 from the paper, written out: -> (logits, encoder bit logits)."""
    cfg = model.config
    half = cfg.encoder_after
    x = model.embed.weight[ids]
    for blk in model.blocks[:half]:
        x = _block_ref(blk, x, x, cfg)
    zeta = model.zeta.expand_as(x)  # the learned query at every position
    y = _block_ref(model.encoder, zeta, x, cfg, causal=False)  # non-causal, RoPE inside
    z_logits = _rms(y, model.encoder_norm.weight, cfg.norm_eps) @ model.encoder_readout.weight.T \
        + model.encoder_readout.bias
    if codes is not None:
        if cfg.mapper == "factored":
            bits = ((codes[..., None] >> torch.arange(cfg.latent_dim)) & 1).float()
            r = bits @ model.mapper.weight + model.mapper.bias
        else:
            r = model.mapper.weight[codes] + model.mapper.bias  # post_sampler(one_hot(d))
        x = _block_ref(model.blocks[half], x, x + r, cfg)  # r in keys/values only
        rest = model.blocks[half + 1:]
    else:
        rest = model.blocks[half:]
    for blk in rest:
        x = _block_ref(blk, x, x, cfg)
    return _rms(x, model.norm.weight, cfg.norm_eps) @ model.lm_head.weight.T, z_logits


@pytest.mark.parametrize("mapper,norm_eps", [("exact", None), ("factored", None),
                                             ("exact", 0.5)])  # an eps that matters
def test_forward_and_encoder_equal_algorithm_2(tiny_model_cfg, mapper, norm_eps):
    cfg = dataclasses.replace(tiny_model_cfg, mapper=mapper, tie_embeddings=False,
                              norm_eps=norm_eps or tiny_model_cfg.norm_eps)
    model = _scaled_up(cfg)
    ids = torch.randint(0, 32, (2, 11))
    codes = torch.randint(0, 16, (2, 11))
    with torch.no_grad():
        ref_logits, ref_z = _free_transformer_ref(model, ids, codes)
        logits, _ = model(ids, z=codes)
        _, z_logits = model(ids, mode="training")
    assert torch.allclose(z_logits, ref_z, atol=1e-4, rtol=1e-4)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    # the references are sensitive: positions and codes move them by far more than atol
    assert (ref_z[:, 1:] - ref_z[:, :1]).abs().max() > 0.1
    other, _ = _free_transformer_ref(model, ids, (codes + 1) % 16)
    assert (other - ref_logits).abs().max() > 0.1


def test_training_forward_conditions_on_the_encoders_sampled_codes(tiny_model_cfg):
    """mode="training": the codes are the posterior's (bits = noise < sigmoid(L))."""
    model = _scaled_up(tiny_model_cfg)
    ids = torch.randint(0, 32, (2, 9))
    noise = torch.rand(2, 9, 4)
    with torch.no_grad():
        logits, z_logits = model(ids, mode="training", bit_noise=noise)
        _, ref_z = _free_transformer_ref(model, ids)
        bits = (noise < torch.sigmoid(ref_z)).long()
        codes = (bits * 2 ** torch.arange(4)).sum(-1)
        ref_logits, _ = _free_transformer_ref(model, ids, codes)
    assert torch.allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_prior_path_uses_the_post_samplers_bias(tiny_model_cfg, monkeypatch):
    """mode="inference": r = W[d] + b for the prior's codes d (bias included)."""
    model = _scaled_up(tiny_model_cfg)
    ids = torch.randint(0, 32, (2, 7))
    codes = torch.randint(0, 16, (2, 7))
    monkeypatch.setattr(model.mapper, "sample_prior", lambda shape, device: codes)
    with torch.no_grad():
        logits, _ = model(ids, mode="inference")
        ref, _ = _free_transformer_ref(model, ids, codes)
    assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4)


def _record_decoding(monkeypatch):
    """Record the logits ``generate`` samples each new token from."""
    import freetf.model.transformer as transformer

    seen = []
    real = transformer._sample_next

    def recording(logits, *args):
        seen.append(logits.clone())
        return real(logits, *args)

    monkeypatch.setattr(transformer, "_sample_next", recording)
    return seen


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_logits_and_codes_per_position(tiny_model_cfg, monkeypatch, use_cache):
    """Each step's logits (not only the argmax) equal a full forward where the prompt is
    conditioned on the encoder's codes and every new token on the prior's."""
    model = _scaled_up(tiny_model_cfg)
    with torch.no_grad():  # a deterministic posterior: every bit's logit is +-20
        model.encoder_readout.weight.zero_()
        model.encoder_readout.bias.copy_(torch.tensor([20.0, -20.0, 20.0, -20.0]))
    encoder_code = 1 + 4  # bits 0 and 2 set
    prior = iter(torch.tensor([[3, 8, 15, 0, 9, 6]]).T.expand(6, 2)[:, :, None])
    monkeypatch.setattr(model.mapper, "sample_prior", lambda shape, device: next(prior))
    seen = _record_decoding(monkeypatch)
    prompt = torch.randint(0, 32, (2, 4))
    torch.manual_seed(0)
    out = model.generate(prompt, 7, temperature=1.0, use_cache=use_cache)
    codes = torch.cat([torch.full((2, 4), encoder_code),
                       torch.tensor([[3, 8, 15, 0, 9, 6]]).expand(2, 6)], 1)  # (2, 10)
    assert len(seen) == 7
    with torch.no_grad():
        ref, _ = _free_transformer_ref(model, out[:, :-1], codes)  # (2, 10, V)
    for step, logits in enumerate(seen):
        assert torch.allclose(logits, ref[:, 3 + step], atol=1e-4, rtol=1e-4), step


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_with_given_codes_matches_the_full_forward(tiny_model_cfg, monkeypatch,
                                                              use_cache):
    model = _scaled_up(tiny_model_cfg)
    seen = _record_decoding(monkeypatch)
    prompt = torch.randint(0, 32, (3, 3))
    z = torch.randint(0, 16, (3, 12))
    torch.manual_seed(0)
    out = model.generate(prompt, 9, temperature=1.0, z=z, use_cache=use_cache)
    with torch.no_grad():
        ref, _ = _free_transformer_ref(model, out[:, :-1], z[:, :11])
    for step, logits in enumerate(seen):
        assert torch.allclose(logits, ref[:, 2 + step], atol=1e-4, rtol=1e-4), step
    assert (ref[:, 2:] - ref[:, 2:].mean(0)).abs().max() > 0.1  # rows differ: codes matter


def test_kv_cache_logits_equal_uncached_at_every_step(tiny_model_cfg, monkeypatch):
    model = _scaled_up(tiny_model_cfg)
    seen = _record_decoding(monkeypatch)
    prompt = torch.randint(0, 32, (2, 5))
    z = torch.randint(0, 16, (2, 20))
    model.generate(prompt, 15, temperature=0.0, z=z)
    cached, seen[:] = list(seen), []
    model.generate(prompt, 15, temperature=0.0, z=z, use_cache=False)
    for a, b in zip(cached, seen, strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- sampling


def _sampling_probs(monkeypatch, logits, **kwargs):
    """The distribution ``_sample_next`` draws from (torch.multinomial's input)."""
    from freetf.model.transformer import _sample_next

    seen = []
    real = torch.multinomial
    monkeypatch.setattr(torch, "multinomial", lambda p, n: seen.append(p.clone()) or real(p, n))
    token = _sample_next(logits, **kwargs)
    assert token.shape == (logits.shape[0], 1)
    return seen[0] if seen else None, token


def test_sampling_distribution_temperature_top_k_top_p(monkeypatch):
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    greedy_probs, token = _sampling_probs(monkeypatch, logits, temperature=0.0, top_k=None,
                                          top_p=None)
    assert greedy_probs is None and token.item() == 0  # temperature 0: argmax, no draw
    probs, _ = _sampling_probs(monkeypatch, logits, temperature=0.5, top_k=None, top_p=None)
    assert torch.allclose(probs, (logits / 0.5).softmax(-1), atol=1e-6)  # fp32 softmax
    probs, _ = _sampling_probs(monkeypatch, logits, temperature=1.0, top_k=2, top_p=None)
    assert torch.allclose(probs, torch.tensor([[2.0, 1.0]]).softmax(-1).new_tensor(
        [[*torch.tensor([2.0, 1.0]).softmax(-1).tolist(), 0.0, 0.0, 0.0]]), atol=1e-6)
    probs, _ = _sampling_probs(monkeypatch, logits, temperature=1.0, top_k=0, top_p=None)
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)  # top_k = 0: off
    probs, _ = _sampling_probs(monkeypatch, logits, temperature=1.0, top_k=50, top_p=None)
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)  # k above the vocabulary: all kept
    # nucleus: the most probable tokens until their mass reaches p, the crossing one kept
    full = logits.softmax(-1)[0]  # .563 .207 .126 .028 .076: cumulated .563 .770 .896 .972
    for top_p, kept in [(0.5, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.8, [0, 1, 2]),
                        (0.95, [0, 1, 2, 4]), (0.99, [0, 1, 2, 4, 3]), (1.0, [0, 1, 2, 3, 4])]:
        probs, _ = _sampling_probs(monkeypatch, logits, temperature=1.0, top_k=None,
                                   top_p=top_p)
        expected = torch.zeros(5)
        expected[kept] = full[kept] / full[kept].sum()
        assert torch.allclose(probs[0], expected, atol=1e-6), top_p
    probs, _ = _sampling_probs(monkeypatch, logits, temperature=1.0, top_k=None, top_p=0.0)
    assert torch.allclose(probs, logits.softmax(-1), atol=1e-6)  # top_p = 0: off
    # a token is dropped only when the mass before it is above p: at exactly p (dyadic
    # probabilities 1/2, 1/4, 1/8, 1/8, no rounding) the second token is kept
    dyadic = torch.tensor([[2.0, 1.0, 0.0, 0.0]]) * math.log(2.0)
    probs, _ = _sampling_probs(monkeypatch, dyadic, temperature=1.0, top_k=None, top_p=0.5)
    assert torch.equal(probs, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))


def test_kv_cache_appends_in_place_up_to_its_capacity():
    cache = KVCache(4)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    keys, values = cache.append(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v) and cache.length == 3
    k1, v1 = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    keys, values = cache.append(k1, v1)  # exactly full
    assert torch.equal(keys, torch.cat([k, k1], 2)) and torch.equal(values, torch.cat([v, v1], 2))
    with pytest.raises(ValueError, match="KV cache full"):
        cache.append(k1, v1)


@pytest.mark.parametrize("prefill", [1, 3])
def test_multi_token_append_to_a_filled_cache_is_refused(tiny_model_cfg, prefill):
    model = FreeTransformer(tiny_model_cfg).eval()
    caches = [KVCache(10) for _ in model.blocks]
    with torch.no_grad():
        model.forward_codes(torch.randint(0, 32, (1, prefill)), caches=caches)
        with pytest.raises(NotImplementedError,
                           match="multi-token append to a non-empty KV cache"):
            model.forward_codes(torch.randint(0, 32, (1, 2)), z=torch.tensor(1), caches=caches)


def test_dropout_acts_in_train_mode_only(tiny_model_cfg):
    model = _scaled_up(dataclasses.replace(tiny_model_cfg, dropout=0.5))
    ids, z = torch.randint(0, 32, (2, 8)), torch.randint(0, 16, (2, 8))
    with torch.no_grad():
        a, _ = model(ids, z=z)
        b, _ = model(ids, z=z)
        ref, _ = _free_transformer_ref(model, ids, z)
        model.train()
        c, _ = model(ids, z=z)
    assert torch.equal(a, b) and torch.allclose(a, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(c, a, atol=1e-2)
    attn = model.blocks[0].attn  # attention dropout on its own: train mode only
    x = torch.randn(2, 8, tiny_model_cfg.hidden_dim)
    with torch.no_grad():
        evaluated = attn.eval()(x, x, model.rope, True)
        assert torch.equal(attn(x, x, model.rope, True), evaluated)
        assert not torch.allclose(attn.train()(x, x, model.rope, True), evaluated, atol=1e-3)


def test_initialisation_scales(tiny_model_cfg):
    cfg = dataclasses.replace(tiny_model_cfg, hidden_dim=128, num_heads=4, init_std=0.05)
    model = FreeTransformer(cfg)
    params = dict(model.named_parameters())
    residual = 0.05 / (2 * cfg.num_layers) ** 0.5  # output projections, scaled by 1/sqrt(2B)
    for name, std in [("blocks.0.attn.wo.weight", residual), ("blocks.1.ffn.w2.weight", residual),
                      ("encoder.attn.wo.weight", residual), ("blocks.0.attn.wq.weight", 0.05),
                      ("blocks.2.ffn.w1.weight", 0.05), ("embed.weight", 0.05),
                      ("encoder_readout.weight", 0.05), ("zeta", 0.05)]:
        assert params[name].std().item() == pytest.approx(std, rel=0.15), name
        assert abs(params[name].mean().item()) < 0.2 * std, name
    assert torch.equal(params["encoder_readout.bias"], torch.zeros(cfg.latent_dim))
    assert torch.equal(params["norm.weight"], torch.ones(cfg.hidden_dim))
    assert params["mapper.weight"].std().item() == pytest.approx(0.02, rel=0.15)  # its own


@pytest.mark.timeout(10)
def test_readout_init_std_scales_the_encoder_readout_alone(tiny_model_cfg):
    """``readout_init_std`` redraws encoder_readout.weight at its own std and nothing
    else: from one seed, every other parameter equals the default model's, and the
    readout is the default's draw scaled by readout_init_std / init_std (0 gives zeros)."""
    def build(readout_init_std):
        torch.manual_seed(0)
        cfg = dataclasses.replace(tiny_model_cfg, readout_init_std=readout_init_std)
        return dict(FreeTransformer(cfg).named_parameters())

    default = build(None)
    for readout_std in (0.0, 0.3):
        params = build(readout_std)
        assert params.keys() == default.keys()
        for name, p in params.items():
            if name != "encoder_readout.weight":
                assert torch.equal(p, default[name]), name
        scale = readout_std / tiny_model_cfg.init_std
        torch.testing.assert_close(params["encoder_readout.weight"],
                                   default["encoder_readout.weight"] * scale)
    assert build(0.0)["encoder_readout.weight"].abs().max() == 0
