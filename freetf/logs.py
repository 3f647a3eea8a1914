"""Logging set-up, done once per process (CLI, Ray worker, sweep driver)."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``freetf.*`` records to stderr; other libraries keep their own settings."""
    logger = logging.getLogger("freetf")
    logger.setLevel(level)
    if not any(getattr(h, "_freetf", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        handler._freetf = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
