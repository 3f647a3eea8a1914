"""Checks on the places freetf writes, shared by every package (no freetf imports)."""

from __future__ import annotations

import os
from pathlib import Path


def unwritable(path: Path, is_file: bool = False) -> str | None:
    """Why ``path`` (a folder, or a file if ``is_file``) cannot be written, or None."""
    path = path.expanduser().absolute()
    if path.exists():
        if is_file and path.is_dir():
            return f"{path} is a folder, not a file"
        if not is_file and not path.is_dir():
            return f"{path} is a file, not a folder"
        target = path if not is_file else path.parent
        if not os.access(target, os.W_OK | os.X_OK) or (is_file and not os.access(path, os.W_OK)):
            return f"no permission to write {path}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder, so {path} cannot be created"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"no permission to create {path} in {parent}"
    return None
