"""The configs shipped inside the package (``freetf/configs/*.yaml``), found by name.

``--config synthetic`` (or ``synthetic.yaml``) works from any folder, whether freetf was
installed from a wheel or from a checkout: an existing file wins, then the shipped config
of that name.  A sweep YAML's ``base_config`` is a path relative to the sweep file, so a
shipped sweep finds its base config beside it.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from freetf.config.tree import ConfigError

SUFFIX = ".yaml"


def shipped_dir() -> Path:
    """The folder of the shipped configs (package data of ``freetf``)."""
    folder = files("freetf").joinpath("configs")
    if not isinstance(folder, Path):  # e.g. a zipped install: no folder to read YAML from
        raise ConfigError(f"freetf's shipped configs are not files on disk ({folder}); "
                          f"give --config a path")
    return folder


def shipped_configs() -> list[str]:
    """The names of the shipped configs (``synthetic``, ``search_kl``, ...), sorted."""
    return sorted(path.stem for path in shipped_dir().glob(f"*{SUFFIX}"))


def config_path(name: str | Path, what: str = "config",
                error: type[ConfigError] = ConfigError) -> Path:
    """The YAML file that ``name`` means: an existing file as given, else the shipped config
    of that name (``search_kl`` or ``search_kl.yaml``: a bare name, without a folder).
    Neither: ``error``, listing the shipped names."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    text = str(name)
    if path.name == text and text not in ("", ".", ".."):  # a bare name, not a path
        shipped = shipped_dir() / (text if text.endswith(SUFFIX) else f"{text}{SUFFIX}")
        if shipped.is_file():
            return shipped
    raise error(f"{what} file not found: {name} (give a YAML file, or the name of a shipped "
                f"config: {', '.join(shipped_configs())})")
