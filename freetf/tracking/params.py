"""What a run logs as MLflow params: the few values a reader compares, by short names.

MLflow's runs table and compare view offer every param as a column or an axis; a run
that logs its whole flattened config (about 90 keys) buries the few that differ between
runs.  A run logs instead:

- :data:`COMPARED_KEYS` under short names (``kl_weight``, ``seed``, ``hidden_dim`` ...),
- kappa in bits (``free_bits_bits``) and its base-2 log (``log2_free_bits_bits``: 1/64,
  1/4, 1 and 4 bits sit evenly on that axis), from either ``training.free_bits`` (nats)
  or ``training.free_bits_bits``,
- the searched keys of a sweep, under the shortest dotted suffix that is unambiguous.

The full resolved config stays with the run: as the ``config.yaml`` artifact, and as the
tag ``freetf.config`` (JSON of the dotted keys), which MLflow's search can match, e.g.
``tags.`freetf.config` LIKE '%"training.amp": "bf16"%'``.  :func:`run_config` reads it
back.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from freetf.config import Config, flatten

logger = logging.getLogger(__name__)

CONFIG_TAG = "freetf.config"
# (short name, config key): what differs between the runs a reader compares.
COMPARED_KEYS = (
    ("kl_weight", "training.kl_weight"),
    ("kl_annealing", "training.kl_annealing.type"),
    ("free_bits_schedule", "training.free_bits_schedule.type"),
    ("seed", "training.seed"),
    ("latent_dim", "model.latent_dim"),
    ("hidden_dim", "model.hidden_dim"),
    ("num_layers", "model.num_layers"),
    ("num_heads", "model.num_heads"),
    ("max_seq_len", "model.max_seq_len"),
    ("batch_size", "training.batch_size"),
    ("learning_rate", "training.learning_rate"),
    ("max_steps", "training.max_steps"),
    ("dataset", "data.dataset_name"),
)


def format_value(value: Any) -> str:
    """A param value as MLflow shows it: floats to 6 significant digits, lists as repr."""
    if hasattr(value, "item"):  # numpy scalars (Tune's samplers)
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value) if isinstance(value, (list, tuple)) else str(value)


def short_names(keys: list[str], taken: set[str] = frozenset()) -> dict[str, str]:
    """Each dotted key's shortest suffix (whole components) unique among ``keys`` and
    not in ``taken``: ``training.kl_annealing.type`` -> ``kl_annealing.type`` beside
    ``training.free_bits_schedule.type``."""
    parts = {key: key.split(".") for key in keys}
    depth = dict.fromkeys(keys, 1)
    while True:
        names = {key: ".".join(parts[key][-depth[key]:]) for key in keys}
        clash = {key for key in keys if names[key] in taken
                 or list(names.values()).count(names[key]) > 1}
        clash = {key for key in clash if depth[key] < len(parts[key])}
        if not clash:
            return names
        for key in clash:
            depth[key] += 1


def kappa_params(cfg: Config) -> dict[str, str]:
    """``free_bits_bits`` (kappa in bits per token) and ``log2_free_bits_bits``."""
    bits = cfg.training.free_bits_nats / math.log(2.0)
    params = {"free_bits_bits": format_value(bits)}
    if bits > 0:
        params["log2_free_bits_bits"] = format_value(round(math.log2(bits), 6))
    return params


def run_params(cfg: Config, searched: tuple[str, ...] = ()) -> dict[str, str]:
    """The params of a run of ``cfg``: compared keys, kappa, searched keys (short names)."""
    flat = flatten(cfg.to_dict())
    params = {name: format_value(flat[key]) for name, key in COMPARED_KEYS}
    if cfg.model.has_latent:
        params.update(kappa_params(cfg))
    else:  # the baseline has no latent: no kappa, no KL weight to compare
        params.pop("kl_weight")
    for key, name in searched_names(searched).items():
        if name not in params and key in flat:
            params[name] = format_value(flat[key])
    return params


def searched_names(keys: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The param name of each searched key: its :data:`COMPARED_KEYS` name, the kappa
    names (``training.free_bits`` is ``free_bits_nats``), else the shortest unambiguous
    dotted suffix (``training.weight_decay`` -> ``weight_decay``)."""
    compared = {key: name for name, key in COMPARED_KEYS}
    compared.update({"training.free_bits_bits": "free_bits_bits",
                     "training.free_bits": "free_bits_nats"})
    names = {key: compared[key] for key in keys if key in compared}
    rest = [key for key in keys if key not in compared]
    taken = {*compared.values(), "log2_free_bits_bits"}
    return {**names, **short_names(rest, taken=taken)}


def config_tag(cfg: Config, limit: int) -> str:
    """The dotted config as JSON for the ``freetf.config`` tag, at most ``limit`` chars
    (the longest values are left out, with a warning, if the whole config is longer)."""
    flat = {key: value for key, value in flatten(cfg.to_dict()).items()}
    text = json.dumps(flat, default=str)
    dropped = []
    while len(text) > limit and flat:
        longest = max(flat, key=lambda k: len(json.dumps(flat[k], default=str)))
        dropped.append(longest)
        del flat[longest]
        text = json.dumps(flat, default=str)
    if dropped:
        logger.warning("tag %s leaves out %s (over MLflow's %d characters); config.yaml "
                       "has them", CONFIG_TAG, ", ".join(dropped), limit)
    return text


def run_config(run) -> dict[str, Any]:
    """The dotted config of an MLflow run: its ``freetf.config`` tag, else its params
    (runs logged before the tag existed logged the whole config as params)."""
    text = run.data.tags.get(CONFIG_TAG)
    if text:
        return {key: ("None" if value is None else format_value(value))
                for key, value in json.loads(text).items()}
    return dict(run.data.params)
