"""save_pretrained / from_pretrained: the same model back, from safetensors and JSON only."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import struct

import pytest
import torch

from freetf import FreeTransformer, load_config
from freetf.model.pretrained import MODEL_TYPE, PretrainedError

pytestmark = pytest.mark.timeout(60)


def _model(latent_dim: int, *extra: str) -> FreeTransformer:
    """Random weights at a scale where the logits move with the position and with Z, and a
    config whose rope_theta, norm_eps and injection_layer differ from the defaults
    (they change the output without changing any weight's shape)."""
    cfg = load_config(overrides=[
        "model.vocab_size=32", "model.hidden_dim=32", "model.num_layers=3",
        "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=40",
        f"model.latent_dim={latent_dim}", "model.rope_theta=500.0", "model.norm_eps=1e-3",
        "model.injection_layer=2", "model.init_std=0.3", "model.post_sampler_init_std=0.3",
        "data.max_seq_len=40", *extra])
    return FreeTransformer(cfg.model).eval()


def _logits(model: FreeTransformer, ids: torch.Tensor, z: torch.Tensor | None):
    with torch.no_grad():
        return model(ids, z=z)[0]  # (B, T, V)


@pytest.mark.parametrize("latent_dim", [4, 0], ids=["free-transformer", "baseline"])
def test_round_trip_gives_the_same_logits(tmp_path, latent_dim):
    model = _model(latent_dim)
    ids = torch.tensor([[3, 7, 7, 7, 1, 30, 7, 12, 7, 5, 7, 7]])  # token 7 at many positions
    z = torch.randint(0, 16, ids.shape) if latent_dim else None
    expected = _logits(model, ids, z)
    sevens = expected[0, ids[0] == 7]  # the same token at six positions: RoPE tells them apart
    assert (sevens - sevens[0]).abs().amax() > 0.1
    if latent_dim:  # and Z changes the output
        assert (_logits(model, ids, (z + 1) % 16) - expected).abs().amax() > 0.1

    model.save_pretrained(tmp_path / "m")
    loaded = FreeTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(_logits(loaded, ids, z), expected)


def test_the_folder_holds_json_and_safetensors_only(tmp_path):
    model = _model(4, "model.tie_embeddings=true")
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {"model_type": MODEL_TYPE, **dataclasses.asdict(model.config)}
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert raw[:1] != b"\x80" and raw[:2] != b"PK"  # neither a pickle nor torch.save's zip
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 length + JSON header
    names = set(json.loads(raw[8:8 + header_len])) - {"__metadata__"}
    unique = {id(p): n for n, p in model.named_parameters()}  # tied: one name kept
    assert len(names) == len(unique) == len(model.state_dict()) - 1
    assert os.stat(tmp_path / "model.safetensors").st_mode == \
        os.stat(tmp_path / "config.json").st_mode  # not owner-only: a folder to hand on


def test_loading_reads_no_pickle(tmp_path, monkeypatch):
    model = _model(4)
    model.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"),
                         (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded = FreeTransformer.from_pretrained(tmp_path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_a_pickle_in_place_of_the_weights_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    model = _model(2)
    model.save_pretrained(tmp_path / "m")
    torch.save({"x": Payload(), **model.state_dict()}, tmp_path / "m" / "model.safetensors")
    with pytest.raises(PretrainedError, match="not a safetensors file"):
        FreeTransformer.from_pretrained(tmp_path / "m")
    assert not marker.exists()
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(PretrainedError, match="holds no model.safetensors"):
        FreeTransformer.from_pretrained(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize("edit,needle", [
    (lambda c: {**c, "model_type": "llama"}, "model_type 'llama' is not"),
    (lambda c: {**c, "hidden_size": 32}, "unknown config key model.hidden_size"),
    (lambda c: {**c, "num_heads": 3}, "model.num_heads"),
    (lambda c: {**c, "hidden_dim": 64, "num_heads": 4}, "does not match"),
    (lambda c: {**c, "latent_dim": 0}, "does not match"),  # the encoder's weights left over
])
def test_a_config_that_does_not_describe_the_weights_is_a_clear_error(tmp_path, edit, needle):
    _model(4).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(PretrainedError, match=needle) as info:
        FreeTransformer.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_folders(tmp_path):
    with pytest.raises(PretrainedError, match="holds no config.json"):
        FreeTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        FreeTransformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(PretrainedError, match="JSON object"):
        FreeTransformer.from_pretrained(tmp_path)


def test_save_makes_a_new_nested_folder_and_marks_the_weights_as_pytorch(tmp_path):
    model = _model(2)
    assert model.save_pretrained(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    raw = (tmp_path / "a" / "b" / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    # the metadata transformers' loaders look for in a PyTorch safetensors file (beside
    # the tied names safetensors records)
    assert json.loads(raw[8:8 + header_len])["__metadata__"]["format"] == "pt"
    # config.json as Hugging Face writes one: a key a line, indented by 2, a final newline
    text = (tmp_path / "a" / "b" / "config.json").read_text()
    assert text.startswith('{\n  "model_type": "free_transformer",\n  "vocab_size": 32,\n')
    assert text.endswith('\n}\n')


def test_from_pretrained_puts_the_model_on_the_device_asked_for(tmp_path):
    _model(2).save_pretrained(tmp_path)
    meta = FreeTransformer.from_pretrained(tmp_path, device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"} and not meta.training
    cpu = FreeTransformer.from_pretrained(str(tmp_path))
    assert {p.device.type for p in cpu.parameters()} == {"cpu"}


@pytest.mark.parametrize("edit,detail", [
    (lambda c: {**c, "latent_dim": 0}, 'Unexpected key(s) in state_dict: "encoder'),
    (lambda c: {**c, "hidden_dim": 64, "num_heads": 4}, "size mismatch for "),
])
def test_weights_that_do_not_match_name_the_first_mismatch(tmp_path, edit, detail):
    _model(4).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(PretrainedError) as info:
        FreeTransformer.from_pretrained(tmp_path)
    prefix = f"{tmp_path / 'model.safetensors'} does not match {path}: "
    assert str(info.value).startswith(prefix + detail), str(info.value)


def test_a_one_line_load_error_is_given_whole(tmp_path, monkeypatch):
    import safetensors.torch

    _model(2).save_pretrained(tmp_path)

    def fail(*args, **kwargs):
        raise RuntimeError("  the one line  ")

    monkeypatch.setattr(safetensors.torch, "load_model", fail)
    with pytest.raises(PretrainedError) as info:
        FreeTransformer.from_pretrained(tmp_path)
    assert str(info.value) == (f"{tmp_path / 'model.safetensors'} does not match "
                               f"{tmp_path / 'config.json'}: the one line")


def test_a_config_that_is_no_object_or_has_no_model_type_is_named(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    with pytest.raises(PretrainedError) as info:
        FreeTransformer.from_pretrained(tmp_path)
    assert str(info.value) == f"{path} must hold a JSON object, got list"
    _model(2).save_pretrained(tmp_path)
    config = json.loads(path.read_text())
    del config["model_type"]
    path.write_text(json.dumps(config))
    with pytest.raises(PretrainedError) as info:
        FreeTransformer.from_pretrained(tmp_path)
    assert str(info.value) == (f"{path}: model_type None is not 'free_transformer': "
                               f"not a Free Transformer")
