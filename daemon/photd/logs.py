"""Structured logging: JSON lines for the journal, a readable console on a terminal.

Every event carries fields rather than prose: ``frame``, ``band``, ``stage``,
``elapsed_s`` and, on failures, ``reason``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Set up structlog once per process.

    Parameters
    ----------
    level : str
        ``debug``, ``info``, ``warning`` or ``error``.
    fmt : str
        ``auto`` (console renderer on a TTY, JSON otherwise), ``json`` or ``console``.
    stream : file-like, optional
        Where to write (default: standard error).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


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
