"""Intake: a file in a watched folder becomes a frame row once it is completely written.

A file still being written (a camera on a network share writes in chunks)
is watched until its size stops changing; one that stays short longer than
``daemon.truncated_timeout_s`` fails as ``truncated``. A non-FITS or
unreadable file fails at once with its reason. A complete frame is hashed
and registered with its band, frame number and observing night.
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
from photd.logbook import watched_root
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


@dataclass
class _Pending:
    first_seen: float
    size: int


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
        comp = check_complete(path, roots=self.roots)
        now = time.time()
        if not comp.complete:
            self._not_complete(path, comp, now)
            return None
        self.incomplete.pop(path, None)
        try:
            st = path.stat()
        except OSError:
            return None  # deleted since the completeness check
        known = self.store.frame_by_path(str(path))
        if known and known["size"] == st.st_size and known["mtime"] == st.st_mtime \
                and known["sha256"]:
            if known["state"] in ("arrived",) and known["id"] not in queued:
                return known["id"]
            return None  # unchanged since we last saw it
        try:
            header = fits.getheader(path)
        except (OSError, ValueError) as exc:
            self.record_failure(path, "unreadable", f"{path.name}: {exc}")
            return None
        band = band_from(path, header, self.cfg, watched_root(path, self.roots))
        number = frame_number_from(header, path.name, self.cfg.detector.frame_number_key)
        night = night_of(header.get("DATE-OBS"), self.cfg.site.utc_offset_h, st.st_mtime)
        try:
            digest = sha256_of(path)
        except OSError:
            return None  # deleted while we read it
        fid, changed = self.store.upsert_frame(
            str(path), size=st.st_size, mtime=st.st_mtime, sha256=digest, band=band,
            frame_number=number, night=night, closed_at=now)
        if not changed:
            return None
        self.log.info("frame arrived", frame=str(path), band=band, stage="intake",
                      frame_number=number)
        return fid

    def _not_complete(self, path: Path, comp: Any, now: float) -> None:
        """Wait for a file still being written; fail it when it cannot become a frame."""
        known = self.store.frame_by_path(str(path))
        if known and known["state"] == "failed" and known["size"] == comp.size:
            self.incomplete.pop(path, None)
            return  # already reported; it will be looked at again if it changes
        if comp.reason in ("not_fits", "unreadable", "outside_watch") and path.exists():
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
        known = self.store.frame_by_path(str(path))
        if known and known["state"] == "failed" and known["sha256"] == digest:
            return
        fid, _ = self.store.upsert_frame(str(path), size=size, mtime=mtime, sha256=digest,
                                         band=None, frame_number=None, night=None,
                                         closed_at=time.time())
        self.store.set_state(fid, "failed", reason)
        self.log.warning("frame failed", frame=str(path), stage="intake", reason=reason,
                         error=message)
