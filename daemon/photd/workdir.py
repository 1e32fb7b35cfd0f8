"""The work folder's layout: where the store, outputs, masters and summaries live.

One place for every path the daemon writes under ``--work DIR``, so that the
reading commands (``photd status``, ``tail`` ...) find what ``photd run`` wrote
without importing the daemon.
"""

from __future__ import annotations

from pathlib import Path

STORE_NAME = "photd.sqlite"


def store_path(work: Path) -> Path:
    """Where the store lives inside a work folder."""
    return Path(work) / STORE_NAME


def pause_marker(work: Path) -> Path:
    """File that says intake is paused for lack of disk (read by ``photd status``)."""
    return Path(work) / "intake-paused.json"


def lock_path(work: Path) -> Path:
    """The lock one running daemon holds on its work folder."""
    return Path(work) / "photd.lock"


def output_path(work: Path, frame: dict) -> Path:
    """The processed copy of a frame: ``frames/<night>/<band>/<raw name>``."""
    raw = Path(frame["path"])
    return Path(work) / "frames" / frame["night"] / (frame["band"] or "x") / raw.name


def master_path(work: Path, night: str, band: str, kind: str, version: int) -> Path:
    """A master calibration: ``masters/<night>/<band>/<kind>_v<version>.fits``."""
    return Path(work) / "masters" / night / band / f"{kind}_v{version:03d}.fits"


def night_folder(work: Path, night: str) -> Path:
    """A night's summary and plots: ``nights/<night>/``."""
    return Path(work) / "nights" / night


def backup_path(work: Path) -> Path:
    """The hourly copy of the store."""
    return Path(work) / "backup" / f"{STORE_NAME}.bak"
