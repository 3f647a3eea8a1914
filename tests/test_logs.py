"""Tests for freetf.logs: the freetf logger's one stderr handler, the quiet console, and
durations as a console prints them."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from freetf import logs
from freetf.logs import QUIET_LOGGERS, duration, setup_console, setup_logging

pytestmark = pytest.mark.timeout(10)


@pytest.fixture
def _restore_loggers():
    names = (*QUIET_LOGGERS, "freetf")
    saved = {name: (logging.getLogger(name).level, logging.getLogger(name).propagate,
                    list(logging.getLogger(name).handlers)) for name in names}
    filters = list(warnings.filters)
    yield
    for name, (level, propagate, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = propagate
        logger.handlers[:] = handlers
    warnings.filters[:] = filters


@pytest.mark.usefixtures("_restore_loggers")
def test_setup_logging_adds_one_handler_writing_to_stderr_as_it_is_now(monkeypatch):
    logger = logging.getLogger("freetf")
    logger.handlers[:] = []
    setup_logging(logging.WARNING)
    setup_logging(logging.WARNING, propagate=False)
    assert len(logger.handlers) == 1 and isinstance(logger.handlers[0], logs._StderrHandler)
    assert logger.level == logging.WARNING and logger.propagate is False
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)  # replaced after the handler was made
    logging.getLogger("freetf.x").warning("seen %d", 1)
    logging.getLogger("freetf.x").info("not seen")
    line = stream.getvalue()
    assert line.endswith(" WARNING freetf.x: seen 1\n") and line.count("\n") == 1
    assert line[2] == line[5] == ":" and line[:8].replace(":", "").isdigit()
    handler = logger.handlers[0]
    handler.stream = io.StringIO()  # StreamHandler assigns it: ignored
    assert handler.stream is sys.stderr
    setup_logging()
    assert logger.level == logging.INFO and logger.propagate is True
    other = logging.StreamHandler(io.StringIO())
    logger.handlers[:] = [other]  # another library's handler is not freetf's
    setup_logging()
    assert len(logger.handlers) == 2 and logger.handlers[0] is other


@pytest.mark.usefixtures("_restore_loggers")
def test_setup_console_quiets_the_libraries_unless_verbose():
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    setup_console(verbose=True)
    assert logging.getLogger("freetf").level == logging.DEBUG
    assert all(logging.getLogger(name).level == logging.INFO for name in QUIET_LOGGERS)
    setup_console(level=logging.WARNING)
    assert logging.getLogger("freetf").level == logging.WARNING
    assert {name: logging.getLogger(name).level for name in QUIET_LOGGERS} == {
        "ray": logging.ERROR, "ray.tune": logging.ERROR, "ray.train": logging.ERROR,
        "mlflow": logging.WARNING, "alembic": logging.WARNING, "urllib3": logging.WARNING,
        "filelock": logging.WARNING}
    setup_console()
    assert logging.getLogger("freetf").level == logging.INFO
    for module, hidden in (("ray", True), ("ray.tune.x", True), ("rayon", False),
                           ("freetf.ray", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", append=True)  # behind setup_console's filter
            warnings.warn_explicit("w", UserWarning, "f.py", 1, module=module)
        assert (not caught) == hidden, module


@pytest.mark.parametrize(("seconds", "text"), [
    (-3, "0s"), (0, "0s"), (0.4, "0s"), (42, "42s"), (59.4, "59s"), (59.5, "1m00s"),
    (60, "1m00s"), (185, "3m05s"), (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"),
    (90000, "25h00m"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text
