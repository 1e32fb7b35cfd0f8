"""Intake: a file in a watched folder becomes a frame row once it is completely written.

A file still being written (a camera on a network share writes in chunks)
is watched until its size stops changing; one that stays short longer than
``daemon.truncated_timeout_s`` fails as ``truncated``. A non-FITS or
unreadable file fails at once with its reason. A complete frame is hashed
and registered with its band, frame number and observing night; a known
frame that changes is hashed again only once it has stopped changing for
``daemon.settle_s`` (a file that keeps growing is not re-hashed per append).

Names and numbers SQLite cannot hold are states, not crashes: a file name
that is not UTF-8 fails as ``bad_name`` (stored under a printable form of the
name), a frame number outside SQLite's 64-bit integers as ``bad_frame_number``.
A frame whose file vanished while a worker had it (``vanished``) is taken
again when the file comes back.
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import astropy.units as u
from astropy.io import fits
from astropy.time import Time

from photd.config import Config
from photd.headers import band_from, frame_number_from
from photd.logbook import is_storable, storable, watched_root
from photd.store import Store
from photd.watcher import check_complete, sha256_of


def night_of(date_obs: str | None, utc_offset_h: float, fallback_unix: float) -> str:
    """The observing night (local date at the start of the night, noon to noon)."""
    try:
        t = Time(date_obs, format="isot", scale="utc") if date_obs else None
    except ValueError:
        t = None
    if t is None:
        t = Time(fallback_unix, format="unix")
    shifted = t + (utc_offset_h - 12.0) * u.hour
    return shifted.to_value("iso", subfmt="date")


#: SQLite's INTEGER range: a frame number outside it cannot be stored.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
#: Reasons that end a file at once (no waiting: it will not become a frame by growing).
FINAL_REASONS = ("not_fits", "unreadable", "outside_watch", "header_too_large")


@dataclass
class _Pending:
    first_seen: float
    size: int
    mtime: float = 0.0  # for a known frame that changed: hashed once it stops changing
    changed_at: float = 0.0


class Intake:
    """Registers completed files as frames; remembers the ones still being written."""

    def __init__(self, cfg: Config, store: Store, roots: list[Path], log: Any) -> None:
        self.cfg = cfg
        self.store = store
        self.roots = roots
        self.log = log
        self.incomplete: dict[Path, _Pending] = {}

    def register(self, path: Path, *, queued: Container[int]) -> int | None:
        """Look at a file; returns the frame id to classify (new, changed or not yet queued)."""
        if not is_storable(path):
            if path.exists():
                self.record_failure(path, "bad_name", f"{storable(path.name)}: the file "
                                    "name is not UTF-8; rename the file to process it")
            return None
        comp = check_complete(path, roots=self.roots)
        now = time.time()
        if not comp.complete:
            self._not_complete(path, comp, now)
            return None
        try:
            st = path.stat()
        except OSError:
            self.incomplete.pop(path, None)
            return None  # deleted since the completeness check
        known = self.store.frame_by_path(str(path))
        came_back = bool(known and known["state"] == "failed"
                         and (known["reason"] or "").startswith("vanished"))
        if known and known["size"] == st.st_size and known["mtime"] == st.st_mtime \
                and known["sha256"]:
            self.incomplete.pop(path, None)
            if came_back:
                return self._take_again(known)
            if known["state"] in ("arrived",) and known["id"] not in queued:
                return known["id"]
            return None  # unchanged since we last saw it
        if known and known["sha256"] and not self._settled(path, st, now):
            return None  # a known frame changing: hash it once it stops changing
        self.incomplete.pop(path, None)
        try:
            header = fits.getheader(path)
        except (OSError, ValueError) as exc:
            self.record_failure(path, "unreadable", f"{path.name}: {exc}")
            return None
        band = band_from(path, header, self.cfg, watched_root(path, self.roots))
        try:
            number = frame_number_from(header, path.name, self.cfg.detector.frame_number_key)
        except (OverflowError, ValueError) as exc:
            number, bad = None, str(exc)
        else:
            bad = "" if number is None or INT64_MIN <= number <= INT64_MAX else str(number)
        if bad:
            self.record_failure(path, "bad_frame_number",
                                f"{path.name}: frame number {bad[:40]} is outside the "
                                "range a frame number can have (64-bit integers)")
            return None
        night = night_of(header.get("DATE-OBS"), self.cfg.site.utc_offset_h, st.st_mtime)
        try:
            digest = sha256_of(path)
        except OSError:
            return None  # deleted while we read it
        fid, changed = self.store.upsert_frame(
            str(path), size=st.st_size, mtime=st.st_mtime, sha256=digest, band=band,
            frame_number=number, night=night, closed_at=now)
        if not changed:
            return self._take_again(known) if came_back and known else None
        self.log.info("frame arrived", frame=str(path), band=band, stage="intake",
                      frame_number=number)
        return fid

    def _settled(self, path: Path, st: Any, now: float) -> bool:
        """Whether a changed file has kept its size and time for ``daemon.settle_s``."""
        pend = self.incomplete.get(path)
        if pend is None or pend.size != st.st_size or pend.mtime != st.st_mtime:
            self.incomplete[path] = _Pending(now, st.st_size, st.st_mtime, now)
            return self.cfg.daemon.settle_s <= 0
        return now - pend.changed_at >= self.cfg.daemon.settle_s

    def _take_again(self, known: dict) -> int:
        """A frame whose file vanished under a worker is back: process it again."""
        self.store.set_state(known["id"], "arrived", "file came back")
        self.log.info("frame came back: taken again", frame=known["path"], stage="intake",
                      reason="came_back")
        return known["id"]

    def _not_complete(self, path: Path, comp: Any, now: float) -> None:
        """Wait for a file still being written; fail it when it cannot become a frame."""
        known = self.store.frame_by_path(str(path))
        if known and known["state"] == "failed" and known["size"] == comp.size:
            self.incomplete.pop(path, None)
            return  # already reported; it will be looked at again if it changes
        if comp.reason in FINAL_REASONS and path.exists():
            self.record_failure(path, comp.reason, f"{path.name}: {comp.message}")
            return
        pend = self.incomplete.get(path)
        timeout_s = self.cfg.daemon.truncated_timeout_s
        if pend is None or pend.size != comp.size:
            self.incomplete[path] = _Pending(now if pend is None else pend.first_seen,
                                             comp.size)
        elif now - pend.first_seen > timeout_s:
            reason = "truncated" if comp.reason != "empty" else "empty"
            self.incomplete.pop(path, None)
            self.record_failure(path, reason,
                                f"{path.name}: {comp.message} after {timeout_s:.0f} s")

    def record_failure(self, path: Path, reason: str, message: str) -> None:
        """A file that cannot become a frame: state ``failed`` with the reason, once."""
        try:
            outside = reason == "outside_watch"  # never read what a link points at
            st = path.lstat() if outside else path.stat()
            size, mtime = st.st_size, st.st_mtime
            digest = "" if outside else sha256_of(path)
        except OSError:
            size, mtime, digest = 0, 0.0, ""
        name = storable(path)
        known = self.store.frame_by_path(name)
        if known and known["state"] == "failed" and known["sha256"] == digest:
            return
        fid, _ = self.store.upsert_frame(name, size=size, mtime=mtime, sha256=digest,
                                         band=None, frame_number=None, night=None,
                                         closed_at=time.time())
        self.store.set_state(fid, "failed", reason)
        self.log.warning("frame failed", frame=name, stage="intake", reason=reason,
                         error=message)
