"""Logging set-up, done once per process (CLI, Ray worker, sweep driver)."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is when a record comes, not as it was when
    the handler was made (a replaced or captured stderr then still gets the records)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; always stderr
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``freetf.*`` records to stderr; other libraries keep their own settings."""
    logger = logging.getLogger("freetf")
    logger.setLevel(level)
    if not any(getattr(h, "_freetf", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        handler._freetf = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
