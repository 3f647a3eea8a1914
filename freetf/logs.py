"""Logging set-up, done once per process (CLI, Ray worker, sweep driver)."""

from __future__ import annotations

import logging
import sys
import warnings

# Loggers whose INFO (and Ray's WARNING) lines are chatter on a console.
QUIET_LOGGERS = {"ray": logging.ERROR, "ray.tune": logging.ERROR, "ray.train": logging.ERROR,
                 "mlflow": logging.WARNING, "alembic": logging.WARNING,
                 "urllib3": logging.WARNING, "filelock": logging.WARNING}


class _StderrHandler(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is when a record comes, not as it was when
    the handler was made (a replaced or captured stderr then still gets the records)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; always stderr
        pass


def setup_logging(level: int = logging.INFO, propagate: bool = True) -> None:
    """Send ``freetf.*`` records to stderr; other libraries keep their own settings.

    ``propagate=False``: not also to the root logger's handlers (a Ray Train worker's root
    logger prints each record again, bare, to the same console)."""
    logger = logging.getLogger("freetf")
    logger.setLevel(level)
    logger.propagate = propagate
    if not any(getattr(h, "_freetf", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        handler._freetf = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def setup_console(verbose: bool = False, level: int = logging.INFO) -> None:
    """Logging for a console (a sweep's, ``freetf train``'s): freetf at ``level`` (DEBUG if
    ``verbose``); Ray, Tune, MLflow and alembic at WARNING/ERROR, and Ray's Python
    warnings off, unless ``verbose``.  Call it after importing Ray and MLflow: importing
    them sets their loggers' levels."""
    setup_logging(logging.DEBUG if verbose else level)
    if verbose:
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")


def duration(seconds: float) -> str:
    """A console's elapsed or remaining time: ``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
