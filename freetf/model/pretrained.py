"""``save_pretrained`` / ``from_pretrained``: a model as a folder loaded without pickle.

A pretrained folder holds two files::

    config.json        the model section of freetf's config (``ModelConfig``, every field)
                       and ``"model_type": "free_transformer"``
    model.safetensors  the weights (tied embeddings stored once)

Hugging Face's ``PyTorchModelHubMixin`` writes the same two names, so
``huggingface_hub.upload_folder`` can publish a folder as it is; this module reads and
writes local folders only and never touches the network.  Loading reads JSON and
safetensors, never pickle: nothing stored in the folder can run code.

This module imports only torch, safetensors and freetf's config.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError

from freetf.config import ConfigError, ModelConfig, build_section

WEIGHTS_FILE, MODEL_CONFIG_FILE = "model.safetensors", "config.json"
MODEL_TYPE = "free_transformer"


class PretrainedError(ValueError):
    """A pretrained folder that is missing, incomplete, or not a Free Transformer's."""


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for a module built as ``cls(config)``."""

    config: ModelConfig

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_model_config(self.config, directory / MODEL_CONFIG_FILE)
        # save_model stores a tensor shared by two names (tied embeddings) once.
        safetensors.torch.save_model(self, str(directory / WEIGHTS_FILE),
                                     metadata={"format": "pt"})
        # safetensors creates its file readable by its owner alone: a folder meant to be
        # handed on gets config.json's permissions (the umask's) for its weights too.
        shutil.copymode(directory / MODEL_CONFIG_FILE, directory / WEIGHTS_FILE)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu"):
        """The model a ``save_pretrained`` folder holds, on ``device``, in eval mode.

        Raises :class:`PretrainedError` for a missing or malformed file and for weights
        that do not match ``config.json``.
        """
        directory = Path(directory)
        model = cls(read_model_config(directory))
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise PretrainedError(f"{directory} holds no {WEIGHTS_FILE} (freetf loads "
                                  f"safetensors weights only, never a pickle file)")
        try:
            safetensors.torch.load_model(model, weights, strict=True)
        except SafetensorError as err:
            raise PretrainedError(f"cannot read {weights}: it is not a safetensors file "
                                  f"({err})") from None
        except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
            lines = str(err).strip().splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise PretrainedError(f"{weights} does not match {directory / MODEL_CONFIG_FILE}:"
                                  f" {detail}") from None
        return model.to(device).eval()


def write_model_config(config: ModelConfig, path: Path) -> None:
    """``config.json``: ``model_type`` and every field of ``config``."""
    fields = dataclasses.asdict(config)
    path.write_text(json.dumps({"model_type": MODEL_TYPE, **fields}, indent=2) + "\n")


def read_model_config(directory: Path) -> ModelConfig:
    """The validated ``ModelConfig`` of ``directory/config.json``."""
    path = directory / MODEL_CONFIG_FILE
    if not path.is_file():
        raise PretrainedError(f"{directory} holds no {MODEL_CONFIG_FILE}: not a folder "
                              f"written by save_pretrained or freetf export")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PretrainedError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise PretrainedError(f"{path} must hold a JSON object, got {type(data).__name__}")
    model_type = data.pop("model_type", None)
    if model_type != MODEL_TYPE:
        raise PretrainedError(f"{path}: model_type {model_type!r} is not {MODEL_TYPE!r}: "
                              f"not a Free Transformer")
    try:
        config = build_section(ModelConfig, data, "model")
        config.validate("model")
    except ConfigError as err:
        raise PretrainedError(f"{path}: {err}") from None
    return config
