"""The daemon: the main loop that turns folder events into finished frames.

The main process owns the store (the single writer) and decides what runs
next; a process pool does the numeric work (:mod:`photd.pipeline`).
APScheduler's background jobs only raise flags (rescan, disk check,
housekeeping) that the main loop acts on, so every store write happens on
one thread.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import astropy.units as u
from apscheduler.schedulers.background import BackgroundScheduler
from astropy.io import fits
from astropy.time import Time

from photd import pipeline
from photd.atomic import atomic_write_text
from photd.calibration import CALIBRATION_KINDS
from photd.config import Config
from photd.headers import band_from, frame_number_from
from photd.logs import configure, get_logger
from photd.obslog import LogEntry, ObservingLog, find_logs, merge_logs, read_log, slug
from photd.pipeline import FrameResult, FrameTask, Masters
from photd.store import Store
from photd.watcher import FolderWatcher, check_complete, is_frame_name, scan, sha256_of

STORE_NAME = "photd.sqlite"
LOG_SUFFIXES = (".log", ".txt", ".csv", ".lst", "")
# Gain (e-/ADU) for judging dark current before the night's flats measure it.
_NOMINAL_GAIN_E_PER_ADU = 1.6


def pause_marker(work: Path) -> Path:
    """File that says intake is paused for lack of disk (read by ``photd status``)."""
    return Path(work) / "intake-paused.json"


def store_path(work: Path) -> Path:
    """Where the store lives inside a work folder."""
    return work / STORE_NAME


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


def sd_notify(message: str) -> None:
    """Send a message to systemd if it is listening (Type=notify); no-op otherwise."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
    except OSError:
        pass


@dataclass
class _Pending:
    first_seen: float
    size: int


@dataclass
class _Flags:
    rescan: bool = True
    disk_check: bool = True
    housekeeping: bool = False
    stop: bool = False


@dataclass
class Engine:
    """Decides what each frame needs next and records what the workers return."""

    cfg: Config
    store: Store
    pool: cf.Executor
    log: Any
    roots: list[Path] = field(default_factory=list)
    queue: deque[int] = field(default_factory=deque)
    inflight: dict[cf.Future, tuple[str, Any]] = field(default_factory=dict)
    # sha256 of the raw file each frame task was started on: a result for
    # content that has since been replaced is dropped, not stored.
    dispatched_sha: dict[cf.Future, str] = field(default_factory=dict)
    incomplete: dict[Path, _Pending] = field(default_factory=dict)
    logs: dict[Path, tuple[float, ObservingLog]] = field(default_factory=dict)
    # Which files of a folder are logs (find_logs reads every candidate): kept
    # until a non-frame file changes or a rescan, the only ways a log appears.
    found_logs: dict[Path, list[Path]] = field(default_factory=dict)
    # (the merged logs keep their parts alive, so the parts' ids stay unique)
    merged_logs: dict[tuple, tuple[tuple, ObservingLog]] = field(default_factory=dict)
    dirty_masters: set[tuple[str, str, str]] = field(default_factory=set)
    # (night, band, target, kind) of queued frames, so that scheduling decisions
    # over a long queue do not read every frame back from the store.
    queue_info: dict[int, tuple] = field(default_factory=dict)
    # Light curves to derive again, (target, band) -> "frame done" events that
    # wait for it; and when each was last derived (time.monotonic()).
    curve_pending: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    curve_derived_at: dict[tuple[str, str], float] = field(default_factory=dict)
    catalog: Any = None  # photd.catalog.CatalogSource
    cones: dict[tuple[float, float], Any] = field(default_factory=dict)
    names: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    lookups: dict[tuple, cf.Future] = field(default_factory=dict)
    lookup_pool: cf.ThreadPoolExecutor = field(
        default_factory=lambda: cf.ThreadPoolExecutor(1, thread_name_prefix="catalog"))
    # Fields without catalog: (night, band, target) -> the reference frame's record
    # (photd.pipeline.relative_reference), and the series measured that way.
    references: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    relative_series: set[tuple[str, str, str]] = field(default_factory=set)
    paused: bool = False
    logs_dirty: bool = False
    pool_broken: bool = False
    last_activity: float = field(default_factory=time.monotonic)

    # ------------------------------------------------------------------ paths
    @property
    def work(self) -> Path:
        return self.cfg.work_dir

    def _root_of(self, path: Path) -> Path | None:
        for root in self.roots:
            try:
                path.relative_to(root)
                return root
            except ValueError:
                continue
        return None

    def output_path(self, frame: dict) -> Path:
        raw = Path(frame["path"])
        return self.work / "frames" / frame["night"] / (frame["band"] or "x") / raw.name

    # ------------------------------------------------------------------ logs
    def _log_for_folder(self, folder: Path) -> list[ObservingLog]:
        out = []
        found = self.found_logs.get(folder)
        if found is None:
            found = self.found_logs[folder] = find_logs(folder, self.cfg.obslog)
        for p in found:
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            cached = self.logs.get(p)
            if cached is None or cached[0] != mtime:
                parsed = read_log(p, self.cfg.obslog)
                for problem in parsed.problems:
                    self.log.warning("observing log problem", stage="obslog",
                                     reason=problem.reason_code,
                                     error=str(problem))
                self.logs[p] = (mtime, parsed)
                cached = self.logs[p]
                # Whoever read it first (a frame's lookup or the log's own event), the
                # frames already waiting must be looked at again: the main loop does it.
                self.logs_dirty = True
            out.append(cached[1])
        return out

    def entry_for(self, frame: dict) -> tuple[LogEntry | None, str]:
        """The log line covering a frame: logs in its folder or any folder above it."""
        raw = Path(frame["path"])
        root = self._root_of(raw) or raw.parent
        folders = []
        folder = raw.parent
        while True:
            folders.append(folder)
            if folder == root or folder.parent == folder:
                break
            folder = folder.parent
        logs = [lg for f in folders for lg in self._log_for_folder(f)]
        if not logs:
            return None, f"no observing log found in {raw.parent} or above it"
        key = tuple(id(lg) for lg in logs)
        if key not in self.merged_logs:
            if len(self.merged_logs) > 64:
                self.merged_logs.clear()
            self.merged_logs[key] = (tuple(logs), merge_logs(logs))
        merged = self.merged_logs[key][1]
        entry = merged.entry_for(frame["frame_number"])
        if entry is None:
            return None, (f"frame {frame['frame_number']} is not covered by "
                          f"{', '.join(sorted({Path(lg.source).name for lg in logs}))}")
        return entry, ""

    def log_changed(self) -> None:
        """A log appeared or grew: release waiting frames, redo frames whose entry changed."""
        for frame in self.store.frames(states=["waiting_log"]):
            self.classify(frame["id"])
        for frame in self.store.frames(states=["done", "badfit", "calibration"]):
            if self._root_of(Path(frame["path"])) is None:
                continue  # from a folder no longer watched: its log is not ours to judge
            entry, _ = self.entry_for(frame)
            fp = entry.fingerprint() if entry is not None else None
            if fp != frame["log_fingerprint"]:
                self.log.info("log entry changed", frame=frame["path"], stage="obslog")
                self.classify(frame["id"])

    # ------------------------------------------------------------------ intake
    def handle_path(self, path: Path) -> None:
        """Something happened to ``path``: a frame, a log, or nothing of ours."""
        self.last_activity = time.monotonic()
        if is_frame_name(path):
            self.intake_frame(path)
        else:
            self.found_logs.pop(path.parent, None)  # it may have become (or stopped being) a log
            if path.suffix.lower() in LOG_SUFFIXES and path.is_file():
                self._log_for_folder(path.parent)
        self.release_if_logs_changed()

    def release_if_logs_changed(self) -> None:
        """After any log was (re)read: release waiting frames, prefetch new targets."""
        if self.logs_dirty:
            self.logs_dirty = False
            self.log_changed()
            self.prefetch()  # fetch the new targets' catalog cones before frames need them

    def intake_frame(self, path: Path) -> None:
        """Register a frame once it is completely written."""
        if self.paused:
            return
        comp = check_complete(path, roots=self.roots)
        now = time.time()
        if not comp.complete:
            known = self.store.frame_by_path(str(path))
            if known and known["state"] == "failed" and known["size"] == comp.size:
                self.incomplete.pop(path, None)
                return  # already reported; it will be looked at again if it changes
            if comp.reason in ("not_fits", "unreadable", "outside_watch") and path.exists():
                self._record_failure(path, comp.reason, f"{path.name}: {comp.message}")
                return
            pend = self.incomplete.get(path)
            if pend is None or pend.size != comp.size:
                self.incomplete[path] = _Pending(now if pend is None else pend.first_seen,
                                                 comp.size)
            elif now - pend.first_seen > self.cfg.daemon.truncated_timeout_s:
                reason = "truncated" if comp.reason != "empty" else "empty"
                self.incomplete.pop(path, None)
                self._record_failure(path, reason, f"{path.name}: {comp.message} after "
                                     f"{self.cfg.daemon.truncated_timeout_s:.0f} s")
            return
        self.incomplete.pop(path, None)
        try:
            st = path.stat()
        except OSError:
            return  # deleted since the completeness check
        known = self.store.frame_by_path(str(path))
        if known and known["size"] == st.st_size and known["mtime"] == st.st_mtime \
                and known["sha256"]:
            if known["state"] in ("arrived",) and known["id"] not in self.queue:
                self.classify(known["id"])
            return  # unchanged since we last saw it
        try:
            header = fits.getheader(path)
        except (OSError, ValueError) as exc:
            self._record_failure(path, "unreadable", f"{path.name}: {exc}")
            return
        root = self._root_of(path)
        band = band_from(path, header, self.cfg, root)
        number = frame_number_from(header, path.name, self.cfg.detector.frame_number_key)
        night = night_of(header.get("DATE-OBS"), self.cfg.site.utc_offset_h, st.st_mtime)
        try:
            digest = sha256_of(path)
        except OSError:
            return  # deleted while we read it
        fid, changed = self.store.upsert_frame(
            str(path), size=st.st_size, mtime=st.st_mtime, sha256=digest, band=band,
            frame_number=number, night=night, closed_at=now)
        if changed:
            self.log.info("frame arrived", frame=str(path), band=band, stage="intake",
                          frame_number=number)
            self.classify(fid)

    def _record_failure(self, path: Path, reason: str, message: str) -> None:
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

    def classify(self, fid: int) -> None:
        """Find the frame's log line and queue it, or say why it waits."""
        frame = self.store.frame(fid)
        if frame is None:
            return
        if frame["frame_number"] is None:
            self.store.set_state(fid, "failed", "no_frame_number")
            return
        if frame["band"] is None:
            self.store.set_state(fid, "failed", "no_band")
            return
        twin = min((f for f in self.store.frames(night=frame["night"], band=frame["band"])
                    if f["frame_number"] == frame["frame_number"] and f["id"] < fid
                    and f["state"] != "failed"), key=lambda f: f["id"], default=None)
        if twin is not None:
            # Two files claim one exposure: measuring both would put it twice in
            # the light curve (and same-named files would share one output path).
            why = (f"duplicate_frame: frame {frame['frame_number']} of band {frame['band']} "
                   f"is already {twin['path']}")
            if frame["state"] != "failed" or frame["reason"] != why:
                self.store.set_state(fid, "failed", why)
                self.log.warning("duplicate frame number", frame=frame["path"],
                                 stage="intake", reason="duplicate_frame", other=twin["path"])
            return
        entry, why = self.entry_for(frame)
        if entry is None:
            if frame["state"] != "waiting_log" or frame["reason"] != why:
                self.store.set_state(fid, "waiting_log", why)
                self.log.info("frame waits for the log", frame=frame["path"],
                              stage="obslog", reason="no_log_entry", detail=why)
            return
        self.store.set_state(fid, "queued", None, kind=entry.kind, target=entry.name,
                             log_source=entry.source, log_line=entry.line_no,
                             log_fingerprint=entry.fingerprint())
        self.queue_info[fid] = (frame["night"], frame["band"], entry.name, entry.kind)
        if fid not in self.queue:
            # Calibration frames go first: every science frame of their band waits
            # for the masters they build.
            if entry.is_calibration:
                # ahead of science frames, behind earlier calibration frames
                at = 0
                while at < len(self.queue) and self._queued_calibration(self.queue[at]):
                    at += 1
                self.queue.insert(at, fid)
            else:
                self.queue.append(fid)

    # ------------------------------------------------------------------ catalog
    def _lookup(self, key: tuple, fn: Any, *args: Any) -> tuple[bool, Any]:
        """Run a catalog/name look-up off the main loop: (finished, result or exception)."""
        fut = self.lookups.get(key)
        if fut is None:
            self.lookups[key] = self.lookup_pool.submit(fn, *args)
            return False, None
        if not fut.done():
            return False, None
        del self.lookups[key]
        exc = fut.exception()
        return True, exc if exc is not None else fut.result()

    def pointing(self, entry: LogEntry) -> tuple[bool, tuple[float, float] | None]:
        """The target's coordinates: the log's, else SIMBAD's through the cache."""
        if entry.ra_deg is not None and entry.dec_deg is not None:
            return True, (entry.ra_deg, entry.dec_deg)
        if entry.name in self.names:
            return True, self.names[entry.name]
        finished, got = self._lookup(("name", entry.name), self.catalog.resolve_name,
                                     entry.name)
        if not finished:
            return False, None
        self.names[entry.name] = None if isinstance(got, BaseException) else got
        return True, self.names[entry.name]

    def stars_for(self, radec: tuple[float, float]) -> tuple[bool, Any]:
        """Reference stars around a pointing: (finished, Table or CatalogUnavailable)."""
        key = (round(radec[0], 3), round(radec[1], 3))
        if key in self.cones:
            return True, self.cones[key]
        if self.catalog.local_file is not None:
            got: Any = self.catalog.stars(*radec)  # a local file: fast, no network
        else:
            finished, got = self._lookup(("cone", *key), self.catalog.stars, *radec)
            if not finished:
                return False, None
        if not isinstance(got, BaseException):
            self.cones[key] = got
        return True, got

    def prefetch(self) -> None:
        """Fetch the cones of every target in the logs before their frames need them."""
        seen = set()
        for _mtime, parsed in self.logs.values():
            for entry in parsed.entries:
                if entry.is_calibration or entry.name in seen:
                    continue
                seen.add(entry.name)
                done, radec = self.pointing(entry)
                if done and radec is not None:
                    self.stars_for(radec)

    # ------------------------------------------------------------------ masters
    def choose_masters(self, night: str, band: str) -> Masters:
        """The night's newest masters, else an earlier night's (flagged provisional)."""
        age = self.cfg.calibration.max_master_age_days
        chosen: dict[str, dict | None] = {}
        provisional = False
        for kind in ("bias", "flat", "dark"):
            row = self.store.latest_calibration(night, band, kind)
            if row is None:
                row = self.store.calibration_before(night, band, kind, age)
                if row is not None or kind != "dark":
                    provisional = True
            chosen[kind] = row
        parts = [f"{k} {r['night']} v{r['version']}" for k, r in chosen.items() if r]
        det = self.store.detector_params(night, band)
        if det:  # a new gain changes every flux in electrons: it is part of the version
            parts.append(f"gain {det['gain_e_per_adu']:.4f}")
        return Masters(
            bias=chosen["bias"]["path"] if chosen["bias"] else None,
            flat=chosen["flat"]["path"] if chosen["flat"] else None,
            dark=chosen["dark"]["path"] if chosen["dark"] else None,
            version=("provisional: " if provisional else "")
            + (", ".join(parts) if parts else "uncalibrated"),
            provisional=provisional)

    def _queued(self, fid: int) -> tuple | None:
        """(night, band, target, kind) of a queued frame."""
        info = self.queue_info.get(fid)
        if info is None:
            f = self.store.frame(fid)
            if f is None:
                return None
            info = self.queue_info[fid] = (f["night"], f["band"], f["target"], f["kind"])
        return info

    def _queued_calibration(self, fid: int) -> bool:
        info = self._queued(fid)
        return info is not None and info[3] in CALIBRATION_KINDS

    def _calibration_busy_bands(self) -> set[tuple[str, str]]:
        """(night, band) whose masters are about to change: their science frames wait."""
        busy = {(k[0], k[1]) for k in self.dirty_masters}
        busy |= {(p[0], p[1]) for kind, p in self.inflight.values()
                 if kind in ("calibration", "master")}
        for fid in self.queue:
            info = self._queued(fid)
            if info and info[3] in CALIBRATION_KINDS:
                busy.add((info[0], info[1]))
        return busy

    def _calibration_busy(self, night: str, band: str) -> bool:
        return (night, band) in self._calibration_busy_bands()

    def _submit_masters(self) -> None:
        busy = {(p[0], p[1], p[2]) for k, p in self.inflight.values() if k == "master"}
        # A backlog of calibration frames (after a restart, or a copied night) gives one
        # rebuild for the whole batch instead of one per frame: wait for the batch.
        busy |= {(p[0], p[1], p[3]) for k, p in self.inflight.values() if k == "calibration"}
        for fid in self.queue:
            info = self._queued(fid)
            if info and info[3] in CALIBRATION_KINDS:
                busy.add((info[0], info[1], info[3]))
        for key in sorted(self.dirty_masters):
            night, band, kind = key
            if key in busy or (kind != "bias" and (night, band, "bias") in self.dirty_masters):
                continue
            if kind != "bias" and (night, band, "bias") in busy:
                continue
            frames = [f for f in self.store.frames(night=night, band=band)
                      if f["kind"] == kind and f["state"] in ("calibration", "rejected")
                      and f["output"]]
            frames.sort(key=lambda f: f["frame_number"])
            bias = self.store.latest_calibration(night, band, "bias")
            if kind != "bias" and bias is None:
                continue  # flats and darks need this night's bias first
            prev = self.store.latest_calibration(night, band, kind)
            version = (prev["version"] + 1) if prev else 1
            out = self.work / "masters" / night / band / f"{kind}_v{version:03d}.fits"
            bias_frames = [f["output"] for f in self.store.frames(
                states=["calibration"], night=night, band=band) if f["kind"] == "bias"]
            fut = self.pool.submit(build_master_task, kind, [f["output"] for f in frames],
                                   self.cfg, band, night, version, str(out),
                                   bias["path"] if bias and kind != "bias" else None,
                                   sorted(bias_frames))
            self.inflight[fut] = ("master", (night, band, kind, version,
                                             {f["output"]: f["id"] for f in frames}))
            self.dirty_masters.discard(key)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, masters: bool = True, science: bool = True) -> None:
        """Hand queued frames to the pool, respecting order and calibration.

        ``masters=False`` and ``science=False`` hold master rebuilds and science
        frames back: while a scan is still registering frames, a batch of
        calibration frames is not complete yet, and a science frame may not
        know yet that its night has calibration frames.
        """
        if self.pool_broken:
            return  # renew_pool() replaces it once the frames in hand are back
        if masters:
            self._submit_masters()
        limit = max(2 * self._workers(), 2)
        busy_series = {p[2] for k, p in self.inflight.values() if k == "science"}
        cal_busy = self._calibration_busy_bands()
        keep: deque[int] = deque()
        while self.queue:
            fid = self.queue.popleft()
            if len(self.inflight) >= limit or self.paused:
                keep.append(fid)
                continue
            info = self._queued(fid)
            if info and info[3] not in CALIBRATION_KINDS and (
                    not science or info[:3] in busy_series or info[:2] in cal_busy):
                keep.append(fid)  # cheap early wait; the checks below are authoritative
                continue
            frame = self.store.frame(fid)
            if frame is None or frame["state"] not in ("queued",):
                self.queue_info.pop(fid, None)
                continue
            entry, _ = self.entry_for(frame)
            if entry is None:
                self.classify(fid)
                continue
            out = str(self.output_path(frame))
            if entry.is_calibration:
                task = FrameTask(fid, frame["path"], out, frame["band"], frame["frame_number"],
                                 frame["night"], entry, self.cfg)
                fut = self.pool.submit(pipeline.process_calibration, task)
                self.inflight[fut] = ("calibration", (frame["night"], frame["band"], fid,
                                                      entry.kind))
                self.dispatched_sha[fut] = frame["sha256"]
            else:
                series = (frame["night"], frame["band"], entry.name)
                if not science or series in busy_series or \
                        (frame["night"], frame["band"]) in cal_busy:
                    keep.append(fid)  # keep time order; wait for the newest masters
                    continue
                ready, radec = self.pointing(entry)
                if not ready:
                    keep.append(fid)
                    continue
                if radec is None:
                    self.store.set_state(fid, "waiting_log", "no_coordinates: log line "
                                         f"{entry.line_no} has no RA/Dec and SIMBAD does "
                                         f"not know {entry.name!r}")
                    continue
                ready, stars = self.stars_for(radec)
                if not ready:
                    keep.append(fid)
                    continue
                if isinstance(stars, BaseException) or len(stars) == 0:
                    # No catalog for this field (none covers it, nothing cached, the
                    # services down): register the frame to the series' first frame
                    # so that the differential light curve still flows.
                    reference = self._reference(series)
                    if reference is None:
                        self.log.warning(
                            "no catalog for this field: frames are registered to this one "
                            "(relative WCS, no zero point)", frame=frame["path"],
                            stage="catalog", reason="catalog_unavailable", target=entry.name,
                            error=str(stars) if isinstance(stars, BaseException)
                            else "no catalog star within the cone")
                    task = replace(self._science_task(fid, frame, entry, out, radec, None),
                                   relative=True, reference=reference)
                else:
                    task = self._science_task(fid, frame, entry, out, radec, stars)
                fut = self.pool.submit(pipeline.process_science, task)
                self.inflight[fut] = ("science", (frame["night"], frame["band"], series, fid,
                                                  task.masters.version))
                self.dispatched_sha[fut] = frame["sha256"]
                busy_series.add(series)
            self.store.set_state(fid, "processing")
            self.queue_info.pop(fid, None)
        self.queue = keep

    def _workers(self) -> int:
        return self.cfg.daemon.workers or os.cpu_count() or 1

    # ------------------------------------------------------------------ relative WCS
    def _reference(self, series: tuple[str, str, str]) -> dict | None:
        """The reference frame of a field without catalog, from memory or the store."""
        if series in self.references:
            return self.references[series]
        night, band, target = series
        for f in sorted(self.store.frames(night=night, band=band),
                        key=lambda f: f["frame_number"] or 0):
            if f["target"] != target or f["kind"] != "object":
                continue
            sol = self.store.solution(f["id"])
            if sol and sol["relative"] == pipeline.RELATIVE_REFERENCE:
                self.references[series] = sol["header"]["relative_reference"]
                return self.references[series]
        return None

    def _relative_done(self, series: tuple[str, str, str], fid: int, solution: dict) -> None:
        """A frame of a field without catalog finished: remember its series' reference."""
        self.relative_series.add(series)
        if solution.get("relative") != pipeline.RELATIVE_REFERENCE:
            return
        ref = solution["header"]["relative_reference"]
        known = self.references.get(series)
        self.references[series] = ref
        if known is not None and known["id"] == ref["id"]:
            return
        self.log.info("reference frame for a field without catalog", stage="solve",
                      frame=self.store.frame(fid)["path"], band=series[1], target=series[2],
                      n_stars=len(ref["stars"]["id"]),
                      target_sep_arcsec=round(ref["target_sep_arcsec"], 2),
                      runner_up_arcsec=round(ref["runner_up_arcsec"], 2))
        # Frames registered to an earlier reference (its frame was reset) measured
        # another star list: measure them again against this one.
        self._requeue_relative(series, keep_reference=ref["id"])

    def _requeue_relative(self, series: tuple[str, str, str],
                          keep_reference: str | None = None) -> int:
        """Measure a series' relative frames again (all, or those of another reference)."""
        night, band, target = series
        n = 0
        for f in self.store.frames(states=["done", "badfit"], night=night, band=band):
            if f["target"] != target or f["id"] in self.queue:
                continue
            sol = self.store.solution(f["id"])
            if not sol or not sol["relative"]:
                continue
            if keep_reference is not None and sol["header"].get("RELREFID") == keep_reference:
                continue
            self.store.set_state(f["id"], "queued", None)
            self.queue.append(f["id"])
            n += 1
        return n

    def _target_radec(self, target: str) -> tuple[float, float] | None:
        for _m, parsed in self.logs.values():
            for entry in parsed.entries:
                if entry.name == target and not entry.is_calibration:
                    return (entry.ra_deg, entry.dec_deg) if entry.ra_deg is not None \
                        else self.names.get(target)
        return None

    def catalog_arrived(self) -> None:
        """A field measured without catalog now has one: measure its frames against it."""
        for series in sorted(self.relative_series):
            radec = self._target_radec(series[2])
            if radec is None:
                continue
            stars = self.cones.get((round(radec[0], 3), round(radec[1], 3)))
            if stars is None or isinstance(stars, BaseException) or len(stars) == 0:
                continue
            n = self._requeue_relative(series)
            self.relative_series.discard(series)
            self.log.info("catalog now covers the field: re-measuring absolutely",
                          stage="catalog", night=series[0], band=series[1], target=series[2],
                          n_frames=n)

    def _science_task(self, fid: int, frame: dict, entry: LogEntry, out: str,
                      radec: tuple[float, float], stars: Any) -> FrameTask:
        masters = self.choose_masters(frame["night"], frame["band"])
        det = self.store.detector_params(frame["night"], frame["band"])
        return FrameTask(
            fid, frame["path"], out, frame["band"], frame["frame_number"], frame["night"],
            entry, self.cfg, masters=masters,
            gain_e_per_adu=det["gain_e_per_adu"] if det else None,
            rdnoise_e=det["rdnoise_e"] if det else None,
            target_radec=radec, stars=stars)

    # ------------------------------------------------------------------ results
    def collect(self, timeout_s: float) -> None:
        """Record every finished task (waits up to ``timeout_s`` for the first)."""
        if not self.inflight:
            return
        done, _ = cf.wait(list(self.inflight), timeout=timeout_s,
                          return_when=cf.FIRST_COMPLETED)
        for fut in done:
            kind, payload = self.inflight.pop(fut)
            sha = self.dispatched_sha.pop(fut, None)
            self.last_activity = time.monotonic()
            if kind in ("calibration", "science"):
                fid = payload[2] if kind == "calibration" else payload[3]
                now = self.store.frame(fid)
                if now is None or now["sha256"] != sha:
                    # The file changed while a worker had it: intake has reset
                    # and re-queued the frame; this result describes old bytes.
                    self.log.info("stale result dropped", stage=kind, reason="content_changed",
                                  frame=now["path"] if now else fid)
                    continue
            try:
                result = fut.result()
            except Exception as exc:  # a worker died (OOM, segfault): fail that frame only
                self._worker_crash(kind, payload, exc)
                continue
            if kind == "calibration":
                self._calibration_done(payload, result)
            elif kind == "master":
                self._master_done(payload, result)
            elif kind == "science":
                self._science_done(payload, result)

    def _worker_crash(self, kind: str, payload: Any, exc: Exception) -> None:
        """A worker died (killed, out of memory): retry its frame, give up after 3 tries."""
        self.log.error("worker crashed", stage=kind, reason=type(exc).__name__, error=str(exc))
        if isinstance(exc, cf.process.BrokenProcessPool):
            self.pool_broken = True
        if kind in ("calibration", "science"):
            fid = payload[2] if kind == "calibration" else payload[3]
            frame = self.store.frame(fid)
            if frame and (frame["attempts"] or 0) < 3:
                self.store.set_state(fid, "queued", None)
                self.queue.append(fid)
            else:
                self.store.set_state(fid, "failed", f"worker_crash: {type(exc).__name__}")
        elif kind == "master":
            self.dirty_masters.add(payload[:3])

    def renew_pool(self) -> None:
        """Replace a broken process pool (one dead worker breaks all of it)."""
        if not self.pool_broken or self.inflight:
            return
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = cf.ProcessPoolExecutor(max_workers=self._workers(),
                                           initializer=pipeline.warm_up)
        start_workers(self.pool, self._workers())
        self.pool_broken = False
        self.log.warning("worker pool restarted", stage="pool", reason="worker_crash")

    def _calibration_done(self, payload: tuple, result: FrameResult) -> None:
        night, band, fid, cal_kind = payload
        frame = self.store.frame(fid)
        if result.state != "calibration":
            self.store.set_state(fid, result.state, result.reason, timings=result.timings)
            self.log.warning("calibration frame failed", frame=frame["path"], band=band,
                             stage="headers", reason=result.reason, error=result.message)
            return
        self.store.set_state(fid, "calibration", None, output=result.output,
                             timings=result.timings)
        self.log.info("calibration frame", frame=frame["path"], band=band, stage="headers",
                      kind=cal_kind, elapsed_s=round(sum(result.timings.values()), 4))
        self.dirty_masters.add((night, band, cal_kind))

    def _master_done(self, payload: tuple, result: dict) -> None:
        night, band, kind, version, id_by_output = payload
        if result.get("error"):
            level = "info" if result["reason"] == "dark_negligible" else "warning"
            getattr(self.log, level)("master not built", stage="master", band=band, kind=kind,
                                     reason=result["reason"], error=result["error"])
            return
        with self.store.transaction():
            self.store.record_calibration(night, band, kind, path=result["path"],
                                          inputs=result["inputs"])
            for out, (reason, message) in result["rejected"].items():
                self.store.set_state(id_by_output[out], "rejected", f"{reason}: {message}")
            for out in result["inputs"]:
                f = self.store.frame(id_by_output[out])
                if f and f["state"] == "rejected":
                    self.store.set_state(id_by_output[out], "calibration", None)
            if result.get("gain"):
                self.store.set_detector_params(night, band, gain_e_per_adu=result["gain"],
                                               rdnoise_e=result["rdnoise"],
                                               inputs=result["gain_inputs"])
        if kind == "bias" and self.store.latest_calibration(night, band, "flat"):
            # flats (and gain) were built against an older master bias: rebuild them
            self.dirty_masters.add((night, band, "flat"))
        self.log.info("master built", stage="master", band=band, kind=kind, version=version,
                      n_inputs=len(result["inputs"]), n_rejected=len(result["rejected"]),
                      elapsed_s=result["elapsed_s"])
        # Later nights without masters of their own may have borrowed this one.
        for later in sorted({f["night"] for f in self.store.frames(band=band)
                             if f["night"] and f["night"] >= night}):
            self._requeue_stale(later, band)

    def _requeue_stale(self, night: str, band: str) -> None:
        """Frames measured with older or provisional masters are measured again."""
        if self._calibration_busy(night, band):
            return
        current = self.choose_masters(night, band).version
        for f in self.store.frames(states=["done", "badfit"], night=night, band=band):
            if f["calib_version"] != current and f["id"] not in self.queue:
                self.log.info("re-measuring with final masters", frame=f["path"], band=band,
                              stage="calibrate", old=f["calib_version"], new=current)
                self.store.set_state(f["id"], "queued", None)
                self.queue.append(f["id"])

    def _science_done(self, payload: tuple, result: FrameResult) -> None:
        night, band, series, fid, calib_version = payload
        frame = self.store.frame(fid)
        # the masters the worker was given, not today's newest: a frame measured
        # with older ones must look stale so that it is measured again
        fields = {"timings": result.timings, "output": result.output,
                  "calib_version": calib_version}
        if result.state == "done":
            target = series[2]
            rows = [dict(m, calib_version=calib_version) for m in result.measurements]
            if result.solution and result.solution.get("relative"):
                ref_no = (result.solution["header"].get("relative_reference") or
                          self._reference(series) or {}).get("frame_number")
                fields["reason"] = (f"relative_wcs: no catalog covers the field; registered "
                                    f"to frame {ref_no}")
            with self.store.transaction():
                self.store.finish_frame(fid, measurements=_known(rows, self.store),
                                        zeropoint=result.zeropoint, solution=result.solution,
                                        state="done", **fields)
                if result.solution and result.solution.get("relative"):
                    self._relative_done(series, fid, result.solution)
                self.store.mark_lightcurve_stale(target, band)
            # "frame done" is logged once the frame's light-curve row is committed.
            self.curve_pending.setdefault((target, band), []).append(
                {"frame": frame["path"], "band": band, "n_stars": len(rows),
                 "elapsed_s": round(sum(result.timings.values()), 4),
                 "closed_at": frame["closed_at"]})
        elif result.state == "badfit":
            self.store.finish_frame(fid, measurements=(), state="badfit",
                                    reason=result.reason, **fields)
            self.log.warning("frame rejected", frame=frame["path"], band=band, stage="solve",
                             reason=result.reason, error=result.message)
        else:
            self.store.set_state(fid, result.state, result.reason, **fields)
            level = "error" if result.state == "failed" else "info"
            getattr(self.log, level)("frame not finished", frame=frame["path"], band=band,
                                     stage="pipeline", state=result.state,
                                     reason=result.reason, error=result.message)
        if result.state in ("done", "badfit"):
            # masters that changed while the worker had the frame: measure it again
            self._requeue_stale(night, band)

    def flush_curves(self, force: bool = False) -> None:
        """Derive the light curves whose measurements changed.

        A series with nothing more queued or running is derived at once (the
        live case: one frame at a time). A backlog of the same series (a
        restart, a copied night) is derived at most every
        ``daemon.lightcurve_interval_s``, since each derivation reads the
        whole night back: one per frame made a night's backlog quadratic.
        """
        if not self.curve_pending:
            return
        waiting = {(p[2][2], p[2][1]) for k, p in self.inflight.values() if k == "science"}
        for fid in self.queue:
            info = self._queued(fid)
            if info and info[3] not in CALIBRATION_KINDS:
                waiting.add((info[2], info[1]))
        for key in list(self.curve_pending):
            last = self.curve_derived_at.get(key)
            if (not force and key in waiting and last is not None
                    and time.monotonic() - last < self.cfg.daemon.lightcurve_interval_s):
                continue
            if not self._curve_ready(key[0]):
                if force:  # stopping: the stale mark in the store carries it to the next start
                    self.curve_pending.pop(key)
                continue
            events = self.curve_pending.pop(key)
            try:
                with self.store.transaction():
                    self._derive_lightcurve(*key)
            except Exception as exc:  # keep the daemon (and the mark) alive; say which curve
                self.log.error("light curve not derived", stage="lightcurve", target=key[0],
                               band=key[1], reason=type(exc).__name__, error=str(exc),
                               frames=[ev["frame"] for ev in events])
                continue
            self.curve_derived_at[key] = time.monotonic()
            for ev in events:
                closed_at = ev.pop("closed_at")
                self.log.info("frame done", stage="store", **ev,
                              latency_s=round(time.time() - closed_at, 3))

    def _target_entry(self, target: str) -> LogEntry | None:
        """The last log line observing ``target`` (it gives the pointing)."""
        found = None
        for _m, parsed in self.logs.values():
            for entry in parsed.entries:
                if entry.name == target and not entry.is_calibration:
                    found = entry
        return found

    def _curve_ready(self, target: str) -> bool:
        """Whether the target's catalog cone is at hand (asking for it if not).

        After a restart the cones are fetched again off the main loop; a curve
        derived before its cone arrives would lose its calibrated magnitudes.
        """
        entry = self._target_entry(target)
        if entry is None:
            return True  # no log line any more: derive from what is stored
        ready, radec = self.pointing(entry)
        if not ready:
            return False
        return radec is None or self.stars_for(radec)[0]

    def _derive_lightcurve(self, target: str, band: str) -> None:
        """Re-derive the target's whole differential curve from the stored measurements.

        Revising the comparison ensemble as the night goes on re-derives every
        earlier point with it, so the curve never mixes ensembles.
        """
        from photd.curves import derive

        entry = self._target_entry(target)
        if entry is None:
            radec = next((k for k in self.cones), None)
        elif entry.ra_deg is not None:
            radec = (entry.ra_deg, entry.dec_deg)
        else:
            radec = self.names.get(target)
        catalog = None if radec is None else \
            self.cones.get((round(radec[0], 3), round(radec[1], 3)))
        if isinstance(catalog, BaseException):
            catalog = None
        # No catalog: a field measured in a relative WCS still has a differential curve.
        got = derive(self.store, catalog, target, band, self.cfg)
        if got is None:
            return
        rows, info = got
        for sid, why in info.rejected.items():
            self.log.info("comparison star dropped", stage="lightcurve", target=target,
                          band=band, star=sid, reason=why)
        self.store.replace_lightcurve(target, band, rows, info.ensemble_version)

    # ------------------------------------------------------------------ loop helpers
    def rescan(self) -> None:
        """Walk the watched folders: catch anything an event missed."""
        self.found_logs.clear()
        for n, path in enumerate(scan(self.roots)):
            if is_frame_name(path):
                self.intake_frame(path)
            if n % 16 == 15:
                # A night's backlog takes seconds to register (every file is
                # hashed): keep the workers busy meanwhile.
                self.dispatch(masters=False, science=False)
                self.collect(timeout_s=0)
        for path in list(self.incomplete):
            self.intake_frame(path)
        for root in self.roots:
            for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
                self._log_for_folder(folder)
        self.release_if_logs_changed()
        self.prefetch()
        self.catalog_arrived()
        for f in self.store.frames(states=["waiting_catalog", "arrived"]):
            self.classify(f["id"])

    def resume(self) -> None:
        """Start-up: every frame the store has not finished is taken up again."""
        for f in self.store.frames(states=["done", "badfit"]):
            if f["kind"] == "object" and f["target"]:
                sol = self.store.solution(f["id"])
                if sol and sol["relative"]:
                    self.relative_series.add((f["night"], f["band"], f["target"]))
        for target, band in self.store.stale_lightcurves():
            # measured before a crash, curve not derived yet
            self.curve_pending.setdefault((target, band), [])
        for f in self.store.unfinished():
            if f["state"] in ("processing", "queued", "arrived", "waiting_log",
                              "waiting_catalog"):
                self.classify(f["id"])
        for night, band, kind in {(f["night"], f["band"], f["kind"])
                                  for f in self.store.frames(states=["calibration"])}:
            latest = self.store.latest_calibration(night, band, kind)
            inputs = set(json.loads(latest["inputs"]) if latest and isinstance(
                latest["inputs"], str) else (latest["inputs"] if latest else []))
            outs = {f["output"] for f in self.store.frames(states=["calibration"], night=night,
                                                           band=band) if f["kind"] == kind}
            if outs - inputs:
                self.dirty_masters.add((night, band, kind))

    def idle(self) -> bool:
        """Nothing queued, running, half-written or waiting to be rebuilt."""
        return not (self.queue or self.inflight or self.incomplete or self.dirty_masters
                    or self.curve_pending)

    def check_disk(self) -> None:
        """Pause intake when the work disk is nearly full; resume when there is room."""
        self.work.mkdir(parents=True, exist_ok=True)
        free_mb = shutil.disk_usage(self.work).free / 1e6
        low = free_mb < self.cfg.daemon.min_free_disk_mb
        marker = pause_marker(self.work)
        if low and not self.paused:
            self.log.error("WORK DISK NEARLY FULL: intake paused", stage="disk",
                           reason="disk_full", free_mb=round(free_mb, 1))
            try:  # for `photd status`; a few bytes, but the disk is nearly full
                atomic_write_text(marker, json.dumps({
                    "since": time.time(), "free_mb": round(free_mb, 1),
                    "min_free_disk_mb": self.cfg.daemon.min_free_disk_mb}))
            except OSError as exc:
                self.log.error("cannot record the pause", stage="disk", reason="disk_full",
                               error=str(exc))
        elif not low:
            if self.paused:
                self.log.warning("work disk has room again: intake resumed", stage="disk",
                                 free_mb=round(free_mb, 1))
                self.paused = False  # before the rescan, which registers nothing while paused
                self.rescan()
            marker.unlink(missing_ok=True)  # also one left by an earlier run
        self.paused = low

    def housekeeping(self) -> None:
        """Night summaries and plots, a backup of the store and an integrity check."""
        t0 = time.perf_counter()
        for night in {f["night"] for f in self.store.frames() if f["night"]}:
            try:
                self.night_summary(night)
            except Exception as exc:  # a plot must never stop the daemon
                self.log.warning("night summary failed", stage="housekeeping", night=night,
                                 reason=type(exc).__name__, error=str(exc))
        dest = self.work / "backup" / f"{STORE_NAME}.bak"
        dest.parent.mkdir(parents=True, exist_ok=True)
        self.store.backup(dest)
        self.store.checkpoint()
        check = self.store.integrity_check()
        level = "info" if check == "ok" else "error"
        getattr(self.log, level)("housekeeping", stage="housekeeping", integrity=check,
                                 backup=str(dest),
                                 elapsed_s=round(time.perf_counter() - t0, 3))

    def night_summary(self, night: str) -> Path:
        """``<work>/nights/<night>/summary.json`` and one light-curve PNG per target."""
        from photd.export import plot_lightcurve

        folder = self.work / "nights" / night
        folder.mkdir(parents=True, exist_ok=True)
        frames = self.store.frames(night=night)
        counts: dict[str, int] = {}
        for f in frames:
            counts[f["state"]] = counts.get(f["state"], 0) + 1
        targets: dict[str, dict] = {}
        for f in frames:
            if f["kind"] == "object" and f["target"]:
                targets.setdefault(f["target"], {})
        for target, info in targets.items():
            rows = [r for r in self.store.lightcurve(target)
                    if any(f["id"] == r["frame_id"] for f in frames)]
            by_band: dict[str, list[dict]] = {}
            for r in rows:
                by_band.setdefault(r["band"], []).append(r)
            for band, rs in by_band.items():
                diffs = sorted(r["diff_mag"] for r in rs if r["diff_mag"] is not None)
                info[band] = {"points": len(rs),
                              "diff_mag_range": [diffs[0], diffs[-1]] if diffs else None,
                              "median_err": sorted(r["diff_mag_err"] or 0 for r in rs)[
                                  len(rs) // 2]}
            if by_band:
                png = folder / f"{slug(target)}.png"
                plot_lightcurve(by_band, {}, png, title=f"{target} {night}")
                info["plot"] = str(png)
        masters = {b: {k: (self.store.latest_calibration(night, b, k) or {}).get("version")
                       for k in ("bias", "flat", "dark")} for b in ("g", "r", "i")}
        detector = {b: self.store.detector_params(night, b) for b in ("g", "r", "i")}
        summary = {"night": night, "counts": counts, "targets": targets, "masters": masters,
                   "detector": {b: ({"gain_e_per_adu": d["gain_e_per_adu"],
                                     "rdnoise_e": d["rdnoise_e"]} if d else None)
                                for b, d in detector.items()}}
        return atomic_write_text(folder / "summary.json",
                                 json.dumps(summary, indent=1, default=str))


def start_workers(pool: cf.ProcessPoolExecutor, workers: int) -> None:
    """Start every worker now (and its warm-up), not when the first frame comes."""
    for _ in range(workers):
        pool.submit(int)


def _known(rows: list[dict], store: Store) -> list[dict]:
    cols = set(store.columns("measurements"))
    return [{k: v for k, v in r.items() if k in cols} for r in rows]


def build_master_task(kind: str, paths: list[str], cfg: Config, band: str, night: str,
                      version: int, out: str, bias_path: str | None,
                      bias_frames: list[str]) -> dict:
    """Worker side of a master rebuild: combine, write, and measure gain/read noise."""
    from photd import calibration

    t0 = time.perf_counter()
    try:
        bias = calibration.read_master(bias_path)[0] if bias_path else None
        exptimes = None
        if kind == "dark":
            exptimes = [float(fits.getheader(p).get("EXPTIME", 0.0)) for p in paths]
            level = calibration.dark_level_adu_per_s(paths, bias, exptimes, cfg.camera(band)) \
                if bias is not None else float("nan")
            # The paper: dark current below 0.1 e-/px/s is negligible; no dark master.
            # Judged from the frames' levels, before combining; with no usable dark
            # (NaN) build_master below says why. The night's gain is not known yet.
            if math.isfinite(level) and not calibration.dark_is_significant(
                    level, gain_e_per_adu=_NOMINAL_GAIN_E_PER_ADU, cam=cfg.camera(band)):
                return {"error": "dark current negligible; darks not applied",
                        "reason": "dark_negligible"}
        res = calibration.build_master(kind, paths, cfg=cfg.calibration, cam=cfg.camera(band),
                                       master_bias=bias, exptimes_s=exptimes)
        written = calibration.write_master(out, res.data, kind=kind, band=band, night=night,
                                           version=version, inputs=res.inputs)
        out_d: dict[str, Any] = {
            "path": str(written), "inputs": list(res.inputs),
            "rejected": {p: (r.reason, r.message) for p, r in res.rejected.items()},
            "elapsed_s": round(time.perf_counter() - t0, 3)}
        if kind == "flat" and len(bias_frames) >= 2 and len(res.inputs) >= 2:
            out_d.update(_gain_readnoise(bias_frames, list(res.inputs)))
        return out_d
    except Exception as exc:  # the master keeps its previous version
        return {"error": str(exc), "reason": getattr(exc, "reason", type(exc).__name__)}


def _gain_readnoise(bias_frames: list[str], flat_frames: list[str]) -> dict:
    """Photon transfer from pairs of the night's biases and flats (paper 4.2)."""
    from photd import calibration

    n = min(len(bias_frames), len(flat_frames), 6) // 2 * 2
    biases = [calibration.read_frame(p)[0] for p in bias_frames[:n]]
    flats = [calibration.read_frame(p)[0] for p in flat_frames[:n]]
    g = calibration.gain_readnoise_pairs(biases, flats)
    return {"gain": float(g.gain_e_per_adu), "rdnoise": float(g.read_noise_e),
            "gain_inputs": bias_frames[:n] + flat_frames[:n]}


# --------------------------------------------------------------------------- run


def run_daemon(cfg: Config, until_idle_s: float | None = None) -> int:
    """``photd run``: watch, process, record; returns the exit status."""
    configure(cfg.daemon.log_level, cfg.daemon.log_format)
    log = get_logger()
    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / "photd.lock", "w")  # noqa: SIM115 (held for the process lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.error("another photd is running on this work folder", stage="start",
                  reason="locked", work=str(work))
        return 1
    roots = [Path(w).resolve() for w in cfg.paths.watch]
    for r in roots:
        if not r.is_dir():
            log.error("watched folder does not exist", stage="start", reason="no_folder",
                      folder=str(r))
            return 2
    from photd.catalog import CatalogError, CatalogSource

    catalog = CatalogSource(cfg.catalog, work, local_file=cfg.paths.catalog or None)
    if cfg.paths.catalog and not Path(cfg.paths.catalog).exists():
        log.warning("reference catalog file not there yet; science frames wait for it",
                    stage="start", reason="catalog_unavailable", catalog=cfg.paths.catalog)
    elif cfg.paths.catalog:
        try:
            catalog.stars(0.0, 0.0, 0.1)  # reads and checks the file once, at start-up
        except CatalogError as exc:
            log.error("reference catalog unusable", stage="start", reason="bad_catalog",
                      error=str(exc))
            return 2
    store = Store.open(store_path(work))
    flags = _Flags()

    def on_signal(signum: int, _frame: Any) -> None:
        flags.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workers = cfg.daemon.workers or os.cpu_count() or 1
    pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=pipeline.warm_up)
    start_workers(pool, workers)
    engine = Engine(cfg, store, pool, log, roots=roots, catalog=catalog)
    watcher = FolderWatcher(roots, polling=cfg.daemon.observer == "polling",
                            poll_interval_s=cfg.daemon.poll_interval_s)
    watcher.start()  # before the first scan, so nothing written meanwhile is missed
    sched = BackgroundScheduler(daemon=True)
    sched.add_job(lambda: setattr(flags, "rescan", True), "interval",
                  seconds=cfg.daemon.rescan_interval_s)
    sched.add_job(lambda: setattr(flags, "disk_check", True), "interval", seconds=15)
    sched.add_job(lambda: setattr(flags, "housekeeping", True), "interval", hours=1)
    sched.start()
    log.info("photd started", stage="start", watch=[str(r) for r in roots], work=str(work),
             workers=workers)
    engine.check_disk()
    engine.resume()
    engine.rescan()
    flags.rescan = False
    sd_notify("READY=1")
    idle_since: float | None = None
    last_status = 0.0
    try:
        while not flags.stop:
            for path in watcher.drain(timeout_s=0.05 if engine.inflight or engine.curve_pending
                                      else 0.2):
                engine.handle_path(path)
            if flags.disk_check:
                flags.disk_check = False
                engine.check_disk()
            if flags.rescan:
                flags.rescan = False
                engine.rescan()
            elif engine.incomplete:
                for path in list(engine.incomplete):
                    engine.intake_frame(path)
            if flags.housekeeping:
                flags.housekeeping = False
                engine.housekeeping()
            engine.renew_pool()
            engine.dispatch()
            engine.flush_curves()  # after dispatch: a series with more frames running waits
            engine.collect(timeout_s=0.05)
            now = time.monotonic()
            if now - last_status > 5:
                last_status = now
                counts = store.counts()
                sd_notify("WATCHDOG=1\nSTATUS=" + ", ".join(f"{k} {v}" for k, v in
                                                            sorted(counts.items())))
            if until_idle_s is not None:
                if engine.idle():
                    idle_since = idle_since or now
                    if now - idle_since >= until_idle_s:
                        break
                else:
                    idle_since = None
    finally:
        sd_notify("STOPPING=1")
        # Finish the frames in hand (their results are recorded), start nothing new.
        engine.queue.clear()
        while engine.inflight:
            engine.collect(timeout_s=1.0)
        engine.flush_curves(force=True)
        if not flags.stop:
            engine.housekeeping()  # the night is processed (--until-idle): summarise it
        sched.shutdown(wait=False)
        engine.lookup_pool.shutdown(wait=False, cancel_futures=True)
        watcher.stop()
        engine.pool.shutdown(wait=True)
        counts = store.counts()
        log.info("photd stopped", stage="stop", counts=counts)
        store.close()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return 0

