"""Structured logging: JSON lines for the journal, a readable console on a terminal.

Every event carries fields rather than prose: ``frame``, ``band``, ``stage``,
``elapsed_s`` and, on failures, ``reason``.

Under systemd (standard error connected to the journal, ``$JOURNAL_STREAM``)
each line starts with its syslog priority, ``<3>`` for an error, ``<4>`` a
warning, ``<6>`` info, so ``journalctl -u photd -p warning`` finds the
rejections. Messages of the libraries that log through the standard
``logging`` module (APScheduler, astropy, watchdog) go through the same
renderer, so the journal holds JSON lines only.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
#: syslog priorities (sd-daemon(3)) by structlog level name.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "warn": 4, "error": 3, "exception": 3,
             "critical": 2}


def writes_to_journal(stream: Any) -> bool:
    """True if ``stream`` is the journal's stream socket (systemd sets ``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _priority_prefix(_logger: Any, method: str, event: Any) -> Any:
    """Final processor: put the line's syslog priority in front, for journald."""
    level = method if method in _PRIORITY else "info"
    return f"<{_PRIORITY[level]}>{event}"


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog, and the standard ``logging`` of libraries, once per process.

    Parameters
    ----------
    level : str
        ``debug``, ``info``, ``warning`` or ``error``.
    fmt : str
        ``auto`` (console renderer on a TTY, JSON otherwise), ``json`` or ``console``.
        JSON written to the journal carries ``<N>`` priority prefixes.
    stream : file-like, optional
        Where to write (default: standard error).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                     else structlog.processors.JSONRenderer())
    tail = [renderer] + ([_priority_prefix] if fmt == "json" and writes_to_journal(stream)
                         else [])
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries' own messages: same renderer, tagged with their logger's name.
    # Their INFO chatter (APScheduler's "Added job") stays out below warning.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, *tail]))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_photd", False)]:
        root.removeHandler(old)
    handler._photd = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(_LEVELS.get(level, logging.INFO), logging.WARNING))


def get_logger(**fields: Any) -> Any:
    """A structlog logger bound to ``fields``."""
    return structlog.get_logger("photd").bind(**fields)


@contextmanager
def timed(log: Any, stage: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log one event for ``stage`` with its ``elapsed_s`` when the block ends.

    The yielded dict collects extra fields to log (e.g. ``n_matches``); an
    exception is logged with the stage and re-raised.
    """
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        yield extra
    except Exception as exc:
        log.warning("stage failed", stage=stage, elapsed_s=round(time.perf_counter() - t0, 4),
                    reason=getattr(exc, "reason", type(exc).__name__), error=str(exc),
                    **fields, **extra)
        raise
    log.info("stage", stage=stage, elapsed_s=round(time.perf_counter() - t0, 4),
             **fields, **extra)
