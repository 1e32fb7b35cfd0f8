"""The daemon's decisions: what each frame needs next, and what to do with what workers return.

The main process owns the store (the single writer) and decides what runs
next; a process pool does the numeric work (:mod:`photd.pipeline`). The
:class:`Engine` ties the rooms together, each owning one piece of state:

- :mod:`photd.intake` files still being written, and registering frames;
- :mod:`photd.logbook` the observing logs per folder;
- :mod:`photd.lookups` catalog cones and resolved names (off the main loop);
- :mod:`photd.frame_queue` the queue and the jobs in flight;
- :mod:`photd.masters` which master rebuilds are due;
- :mod:`photd.series` fields without catalog (relative WCS);
- :mod:`photd.curves` light curves waiting to be derived;
- :mod:`photd.housekeeping` the disk check, backups and night summaries.

The run loop, lock, signals and pool live in :mod:`photd.service`.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from photd import housekeeping, pipeline
from photd.config import Config
from photd.curves import PendingCurves
from photd.frame_queue import (
    STAGE_OF,
    CalibrationJob,
    FrameQueue,
    InFlight,
    Job,
    MasterJob,
    Queued,
    ScienceJob,
)
from photd.intake import Intake
from photd.logbook import Logbook, storable, watched_root
from photd.lookups import Lookups
from photd.masters import MasterRebuilds, choose_masters, requeue_stale
from photd.obslog import LogEntry
from photd.pipeline import FrameResult, FrameTask
from photd.series import RelativeSeries
from photd.store import Store, store_fault
from photd.target_book import TargetBook
from photd.watcher import MAX_DEPTH, is_frame_name, walk
from photd.workdir import output_path


def worker_count(cfg: Config) -> int:
    """Worker processes: the configured number, else one per core."""
    return cfg.daemon.workers or os.cpu_count() or 1


def _known(rows: list[dict], store: Store) -> list[dict]:
    cols = set(store.columns("measurements"))
    return [{k: v for k, v in r.items() if k in cols} for r in rows]


@dataclass
class Engine:
    """Decides what each frame needs next and records what the workers return."""

    cfg: Config
    store: Store
    pool: cf.Executor | None
    log: Any
    roots: list[Path] = field(default_factory=list)
    catalog: Any = None  # photd.catalog.CatalogSource
    paused: bool = False  # intake paused: the work disk is nearly full
    pool_broken: bool = False  # a worker died; photd.service replaces the pool
    pool_broken_since: float | None = None
    pool_renewed_at: float = 0.0
    last_activity: float = field(default_factory=time.monotonic)
    # Long steps call it (the service answers systemd's watchdog); True: stop requested.
    heartbeat: Callable[[], bool] = lambda: False
    min_free_disk_mb: float | None = None  # None: the configured value as it is

    def __post_init__(self) -> None:
        self.queue = FrameQueue(self.store)
        self.inflight = InFlight()
        self.intake = Intake(self.cfg, self.store, self.roots, self.log)
        self.logbook = Logbook(self.cfg.obslog, self.roots, self.log)
        self.lookups = Lookups(self.catalog)
        self.masters = MasterRebuilds()
        self.series = RelativeSeries(self.store, self.queue, self.log)
        self.curves = PendingCurves(self.store, self.cfg, self.log)
        self.targets = TargetBook(self.cfg, self.store, self.lookups, self.log)
        self._too_deep: set[Path] = set()  # folders below the depth limit, reported once
        self._master_crashes: dict[tuple[str, str, str], int] = {}
        self._said_waiting: str | None = None  # the last "frames wait for a log" warning

    @property
    def work(self) -> Path:
        return self.cfg.work_dir

    # ------------------------------------------------------------------ intake and logs
    def handle_path(self, path: Path) -> None:
        """Something happened to ``path``: a frame, a log, or nothing of ours."""
        self.last_activity = time.monotonic()
        if is_frame_name(path):
            self.intake_frame(path)
        else:
            self.logbook.file_changed(path)
        self.release_if_logs_changed()

    def intake_frame(self, path: Path) -> None:
        """Register a frame once it is completely written, and classify it."""
        if self.paused:
            return
        fid = self.intake.register(path, queued=self.queue)
        if fid is not None:
            self.classify(fid)

    def release_if_logs_changed(self) -> None:
        """After any log was (re)read: release waiting frames, prefetch new targets."""
        if self.logbook.take_changes():
            self.log_changed()
            # fetch the new targets' catalog cones before frames need them
            self.lookups.prefetch(self.logbook.entries())

    def log_changed(self) -> None:
        """A log appeared or grew: release waiting frames, redo frames whose entry changed."""
        for frame in self.store.frames(states=["waiting_log"]):
            self.classify(frame["id"])
        for frame in self.store.frames(states=["done", "badfit", "calibration"]):
            if watched_root(Path(frame["path"]), self.roots) is None:
                continue  # from a folder no longer watched: its log is not ours to judge
            entry, _ = self.logbook.entry_for(frame)
            fp = entry.fingerprint() if entry is not None else None
            if fp != frame["log_fingerprint"]:
                self.log.info("log entry changed", frame=frame["path"], stage="obslog")
                self.classify(frame["id"])

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
        entry, why = self.logbook.entry_for(frame)
        if entry is None:
            if frame["state"] in ("done", "badfit") and frame["target"]:
                # Its log line went: its rows leave the light curve and the exports
                # until the line comes back (then the frame is measured again).
                self.store.drop_results(fid)
                self.store.mark_lightcurve_stale(frame["target"], frame["band"])
                self.curves.add(frame["target"], frame["band"])
            if frame["state"] != "waiting_log" or frame["reason"] != why:
                self.store.set_state(fid, "waiting_log", why)
                self.log.info("frame waits for the log", frame=frame["path"],
                              stage="obslog", reason="no_log_entry", detail=why)
            return
        self.store.set_state(fid, "queued", None, kind=entry.kind, target=entry.name,
                             log_source=entry.source, log_line=entry.line_no,
                             log_fingerprint=entry.fingerprint())
        # Calibration frames go first: every science frame of their band waits
        # for the masters they build.
        self.queue.put(fid, Queued(frame["night"], frame["band"], entry.name, entry.kind))

    # ------------------------------------------------------------------ dispatch
    def calibration_busy_bands(self) -> set[tuple[str, str]]:
        """(night, band) whose masters are about to change: their science frames wait."""
        return (self.masters.busy_bands() | self.inflight.calibration_bands()
                | {(n, b) for n, b, _kind in self.queue.calibration_keys()})

    def dispatch(self, masters: bool = True, science: bool = True) -> None:
        """Hand queued frames to the pool, respecting order and calibration.

        ``masters=False`` and ``science=False`` hold master rebuilds and science
        frames back: while a scan is still registering frames, a batch of
        calibration frames is not complete yet, and a science frame may not
        know yet that its night has calibration frames.
        """
        if self.pool_broken:
            return  # photd.service replaces the pool once the frames in hand are back
        if masters:
            for job, task in self.masters.due(self.store, self.cfg, self.inflight.master_keys()
                                              | self.queue.calibration_keys()):
                fut = self._submit(pipeline.process_master, task)
                if fut is None:
                    self.masters.mark(*job.key)  # rebuilt once the pool is replaced
                    continue
                self.inflight.add(fut, job)
        limit = max(2 * worker_count(self.cfg), 2)
        busy_series = self.inflight.science_series()
        cal_busy = self.calibration_busy_bands()
        keep: list[int] = []
        for fid in self.queue.drain():
            if len(self.inflight) >= limit or self.paused or self.pool_broken:
                keep.append(fid)
                continue
            info = self.queue.info(fid)
            if info and not info.is_calibration and (
                    not science or info[:3] in busy_series or info[:2] in cal_busy):
                keep.append(fid)  # cheap early wait; the checks below are authoritative
                continue
            frame = self.store.frame(fid)
            if frame is None or frame["state"] not in ("queued",):
                self.queue.forget(fid)
                continue
            entry, _ = self.logbook.entry_for(frame)
            if entry is None:
                self.classify(fid)
                continue
            if entry.is_calibration:
                if not self._start_calibration(frame, entry):
                    keep.append(fid)
                    continue
            else:
                series = (frame["night"], frame["band"], entry.name)
                if not science or series in busy_series or \
                        (frame["night"], frame["band"]) in cal_busy:
                    keep.append(fid)  # keep time order; wait for the newest masters
                    continue
                started = self._start_science(frame, entry)
                if started is None:
                    keep.append(fid)
                    continue
                if not started:
                    continue
                busy_series.add(series)
            self.store.set_state(fid, "processing")
            self.queue.forget(fid)
        self.queue.keep(keep)

    def _submit(self, fn: Callable, task: Any) -> cf.Future | None:
        """Hand a task to the pool; None when the pool is broken (it is replaced, the
        frame waits in the queue): a worker killed a moment ago breaks ``submit`` too."""
        if self.pool is None or self.pool_broken:
            return None
        try:
            return self.pool.submit(fn, task)
        except (cf.process.BrokenProcessPool, RuntimeError) as exc:
            self._mark_broken(exc)
            return None

    def _mark_broken(self, exc: BaseException) -> None:
        if not self.pool_broken:
            self.log.error("worker pool broken: it is replaced, its frames retried",
                           stage="pool", reason=type(exc).__name__, error=str(exc))
            self.pool_broken = True
            self.pool_broken_since = time.monotonic()

    def _start_calibration(self, frame: dict, entry: LogEntry) -> bool:
        task = FrameTask(frame["id"], frame["path"], str(output_path(self.work, frame)),
                         frame["band"], frame["frame_number"], frame["night"], entry, self.cfg)
        fut = self._submit(pipeline.process_calibration, task)
        if fut is None:
            return False
        self.inflight.add(fut, CalibrationJob(frame["id"], frame["night"], frame["band"],
                                              entry.kind, frame["sha256"]))
        return True

    def _start_science(self, frame: dict, entry: LogEntry) -> bool | None:
        """Start a science frame: True started, None wait (a look-up runs), False not now."""
        fid = frame["id"]
        ready, radec = self.lookups.pointing(entry)
        if not ready:
            return None
        if radec is None:
            self.store.set_state(fid, "waiting_log", "no_coordinates: log line "
                                 f"{entry.line_no} has no RA/Dec and SIMBAD does "
                                 f"not know {entry.name!r}")
            return False
        ready, stars = self.lookups.stars_for(radec)
        if not ready:
            return None
        out = str(output_path(self.work, frame))
        if isinstance(stars, BaseException) or len(stars) == 0:
            # No catalog for this field (none covers it, nothing cached, the
            # services down): register the frame to the series' first frame
            # so that the differential light curve still flows.
            reference = self.series.reference((frame["night"], frame["band"], entry.name))
            if reference is None:
                self.log.warning(
                    "no catalog for this field: frames are registered to this one "
                    "(relative WCS, no zero point)", frame=frame["path"],
                    stage="catalog", reason="catalog_unavailable", target=entry.name,
                    error=str(stars) if isinstance(stars, BaseException)
                    else "no catalog star within the cone")
            task = replace(self.science_task(frame, entry, out, radec, None),
                           relative=True, reference=reference)
        else:
            task = self.science_task(frame, entry, out, radec, stars)
            prior, status = self.targets.for_frame(frame["night"], entry, stars)
            task = replace(task, target=prior, target_status=status)
        fut = self._submit(pipeline.process_science, task)
        if fut is None:
            return None  # the pool is being replaced: the frame waits its turn
        self.inflight.add(fut, ScienceJob(fid, frame["night"], frame["band"], entry.name,
                                          task.masters.version, frame["sha256"]))
        return True

    def science_task(self, frame: dict, entry: LogEntry, out: str,
                     radec: tuple[float, float], stars: Any) -> FrameTask:
        """What a worker needs for a science frame: the masters, gain, pointing and stars."""
        masters = choose_masters(self.store, self.cfg, frame["night"], frame["band"])
        det = self.store.detector_params(frame["night"], frame["band"])
        return FrameTask(
            frame["id"], frame["path"], out, frame["band"], frame["frame_number"],
            frame["night"], entry, self.cfg, masters=masters,
            gain_e_per_adu=det["gain_e_per_adu"] if det else None,
            rdnoise_e=det["rdnoise_e"] if det else None,
            target_radec=radec, stars=stars)

    # ------------------------------------------------------------------ results
    def collect(self, timeout_s: float) -> None:
        """Record every finished task (waits up to ``timeout_s`` for the first)."""
        if not self.inflight:
            return
        done, _ = cf.wait(self.inflight.futures(), timeout=timeout_s,
                          return_when=cf.FIRST_COMPLETED)
        for fut in done:
            job = self.inflight.pop(fut)
            self.last_activity = time.monotonic()
            if not isinstance(job, MasterJob):
                now = self.store.frame(job.frame_id)
                if now is None or now["sha256"] != job.sha256:
                    # The file changed while a worker had it: intake has reset
                    # and re-queued the frame; this result describes old bytes.
                    self.log.info("stale result dropped", stage=STAGE_OF[type(job)],
                                  reason="content_changed",
                                  frame=now["path"] if now else job.frame_id)
                    continue
            try:
                result = fut.result()
            except Exception as exc:  # a worker died (OOM, segfault): fail that frame only
                self._worker_crash(job, exc)
                continue
            self._record(job, result)

    def _record(self, job: Job, result: Any) -> None:
        """Store what a worker returned; a failure to store it ends that frame only.

        The store's own faults (disk full, a lock held elsewhere, read-only) are
        not the frame's: they go up to the loop, which retries or stops, and the
        frame, still ``processing`` in the store, is taken up again.
        """
        try:
            if isinstance(result, FrameResult) and result.state == "failed" \
                    and result.reason == "unreadable":
                frame = self.store.frame(job.frame_id)
                if frame and not os.path.exists(frame["path"]):
                    # gone while the worker had it: intake takes it again if it comes back
                    result.reason = "vanished"
            if isinstance(job, CalibrationJob):
                self.calibration_done(job, result)
            elif isinstance(job, MasterJob):
                self.master_done(job, result)
            else:
                self.science_done(job, result)
        except Exception as exc:
            if isinstance(exc, OSError) or store_fault(exc):
                raise
            why = f"{type(exc).__name__}: {exc}"[:500]
            if isinstance(job, MasterJob):
                self.log.error("master not recorded", stage="master", band=job.band,
                               kind=job.kind, reason=type(exc).__name__, error=why)
                return
            self.log.error("frame results not stored: frame failed", stage="store",
                           frame=job.frame_id, reason=type(exc).__name__, error=why)
            self.store.set_state(job.frame_id, "failed", why)

    #: Tries of one frame whose worker died before it is failed (an OOM frame
    #: must not break the pool for ever).
    MAX_ATTEMPTS = 3

    def _worker_crash(self, job: Job, exc: BaseException) -> None:
        """A worker died (killed, out of memory): retry its frame, give up after 3 tries."""
        self.log.error("worker crashed", stage=STAGE_OF[type(job)], reason=type(exc).__name__,
                       error=str(exc))
        if isinstance(exc, cf.process.BrokenProcessPool):
            self._mark_broken(exc)
        self.worker_lost(job, type(exc).__name__)

    def worker_lost(self, job: Job, why: str) -> None:
        """A job whose worker is gone: queued again (bounded), else ``failed`` with the reason."""
        if isinstance(job, MasterJob):
            crashes = self._master_crashes.get(job.key, 0) + 1
            self._master_crashes[job.key] = crashes
            if crashes <= self.MAX_ATTEMPTS:
                self.masters.mark(*job.key)
            else:
                self.log.error("master rebuild given up: its worker died every time",
                               stage="master", band=job.band, kind=job.kind,
                               reason="worker_crash", tries=crashes)
            return
        frame = self.store.frame(job.frame_id)
        if frame is None:
            return
        if (frame["attempts"] or 0) < self.MAX_ATTEMPTS:
            self.queue.requeue(job.frame_id)
        else:
            self.store.set_state(job.frame_id, "failed", f"worker_crash: {why}")
            self.log.error("frame failed: its worker died every time", frame=frame["path"],
                           stage=STAGE_OF[type(job)], reason="worker_crash",
                           tries=frame["attempts"])

    def calibration_done(self, job: CalibrationJob, result: FrameResult) -> None:
        frame = self.store.frame(job.frame_id)
        if result.state != "calibration":
            self.store.set_state(job.frame_id, result.state, result.reason,
                                 timings=result.timings)
            self.log.warning("calibration frame failed", frame=frame["path"], band=job.band,
                             stage="headers", reason=result.reason, error=result.message)
            return
        self.store.set_state(job.frame_id, "calibration", None, output=result.output,
                             timings=result.timings)
        self.log.info("calibration frame", frame=frame["path"], band=job.band, stage="headers",
                      kind=job.kind, elapsed_s=round(sum(result.timings.values()), 4))
        self.masters.mark(job.night, job.band, job.kind)

    def master_done(self, job: MasterJob, result: dict) -> None:
        if result.get("error"):
            level = "info" if result["reason"] == "dark_negligible" else "warning"
            getattr(self.log, level)("master not built", stage="master", band=job.band,
                                     kind=job.kind, reason=result["reason"],
                                     error=result["error"])
            return
        self.masters.built(self.store, job, result)
        self.log.info("master built", stage="master", band=job.band, kind=job.kind,
                      version=job.version, n_inputs=len(result["inputs"]),
                      n_rejected=len(result["rejected"]), elapsed_s=result["elapsed_s"])
        # Later nights without masters of their own may have borrowed this one.
        for later in sorted({f["night"] for f in self.store.frames(band=job.band)
                             if f["night"] and f["night"] >= job.night}):
            self._requeue_stale(later, job.band)

    def _requeue_stale(self, night: str, band: str) -> None:
        """Frames measured with older or provisional masters are measured again."""
        if (night, band) not in self.calibration_busy_bands():
            requeue_stale(self.store, self.cfg, self.queue, night, band, self.log)

    def science_done(self, job: ScienceJob, result: FrameResult) -> None:
        fid, band = job.frame_id, job.band
        frame = self.store.frame(fid)
        # the masters the worker was given, not today's newest: a frame measured
        # with older ones must look stale so that it is measured again
        fields = {"timings": result.timings, "output": result.output,
                  "calib_version": job.calib_version}
        if result.state == "done" and self.targets.record(job.night, job.target, frame,
                                                          result.target):
            # measured before the night's target position was decided, elsewhere
            self.queue.requeue(fid)
            return
        if result.state == "done":
            rows = [dict(m, calib_version=job.calib_version) for m in result.measurements]
            relative = bool(result.solution and result.solution.get("relative"))
            if relative:
                ref_no = self.series.registered_to(job.series, result.solution)
                fields["reason"] = (f"relative_wcs: no catalog covers the field; registered "
                                    f"to frame {ref_no}")
            with self.store.transaction():
                self.store.finish_frame(fid, measurements=_known(rows, self.store),
                                        zeropoint=result.zeropoint, solution=result.solution,
                                        state="done", **fields)
                if relative:
                    self.series.frame_done(job.series, fid, result.solution)
                self.store.mark_lightcurve_stale(job.target, band)
            # "frame done" is logged once the frame's light-curve row is committed.
            self.curves.add(job.target, band, {
                "frame": frame["path"], "band": band, "n_stars": len(rows),
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
            self._requeue_stale(job.night, band)

    # ------------------------------------------------------------------ light curves
    def flush_curves(self, force: bool = False) -> None:
        """Derive the light curves whose measurements changed (see PendingCurves)."""
        if not self.curves:
            return
        def last_entry(target: str) -> LogEntry | None:  # the last line gives the pointing
            return (self.logbook.target_entries(target) or [None])[-1]

        self.curves.flush(waiting=self.inflight.science_curves() | self.queue.science_curves(),
                          ready=lambda t: self.lookups.cone_at_hand(last_entry(t)),
                          catalog_of=lambda t: self.lookups.curve_catalog(last_entry(t)),
                          force=force)

    # ------------------------------------------------------------------ loop helpers
    def rescan(self) -> None:
        """Walk the watched folders: catch anything an event missed."""
        tree = walk(self.roots)
        self._report_too_deep(tree.too_deep)
        self.logbook.forget_found()
        for n, path in enumerate(tree.files):
            if is_frame_name(path):
                self.intake_frame(path)
            if n % 16 == 15:
                # A night's backlog takes seconds to register (every file is
                # hashed): keep the workers busy meanwhile.
                self.dispatch(masters=False, science=False)
                self.collect(timeout_s=0)
                if self.heartbeat():
                    return  # stopping: the next start rescans
        for path in list(self.intake.incomplete):
            self.intake_frame(path)
        self.logbook.read_all(tree.folders)
        self.release_if_logs_changed()
        self.lookups.prefetch(self.logbook.entries())
        self.series.catalog_arrived(lambda t: self.lookups.known_cone(
            (self.logbook.target_entries(t) or [None])[0]))
        for f in self.store.frames(states=["waiting_catalog", "arrived"]):
            self.classify(f["id"])

    def _report_too_deep(self, too_deep: list[Path]) -> None:
        """Warn once about folders nested past the depth limit (their files are not read)."""
        new = [p for p in too_deep if p not in self._too_deep]
        if new:
            self._too_deep.update(new)
            self.log.warning("folders nested too deep are not looked into", stage="watch",
                             reason="too_deep", max_depth=MAX_DEPTH, count=len(new),
                             example=storable(new[0]))

    def recover(self) -> None:
        """After a fault: rebuild the queue from the store (the journal).

        A step cut short may have taken frames off the queue, or lost a
        worker's result before it was stored; every frame the store calls
        ``queued``, ``processing`` or ``arrived`` that no worker has is
        classified (queued) again.
        """
        in_hand = self.inflight.frame_ids()
        for f in self.store.frames(states=["queued", "processing", "arrived"]):
            if f["id"] not in in_hand and f["id"] not in self.queue:
                self.classify(f["id"])

    def went_idle(self) -> None:
        """Nothing left to do: say so if frames wait for a log while logs exist."""
        summary = self.waiting_for_log_summary()
        if summary and summary != self._said_waiting:  # a live night goes idle often
            self.log.warning(summary, stage="obslog", reason="waiting_log")
        self._said_waiting = summary

    def waiting_for_log_summary(self) -> str | None:
        """``N frames wait ... (e.g. PATH: WHY)`` when logs were found but do not cover them."""
        if not self.logbook.any_log():
            return None
        waiting = self.store.frames(states=["waiting_log"])
        if not waiting:
            return None
        example = waiting[0]
        return (f"{len(waiting)} frame(s) wait for an observing log line although logs "
                f"were found in the watched folders (e.g. {example['path']}: "
                f"{example['reason']})")

    def resume(self) -> None:
        """Start-up: every frame the store has not finished is taken up again."""
        self.series.resume()
        for target, band in self.store.stale_lightcurves():
            # measured before a crash, curve not derived yet
            self.curves.add(target, band)
        for f in self.store.unfinished():
            if f["state"] in ("processing", "queued", "arrived", "waiting_log",
                              "waiting_catalog"):
                self.classify(f["id"])
        self.masters.resume(self.store)

    def idle(self) -> bool:
        """Nothing queued, running, half-written or waiting to be rebuilt."""
        return not (self.queue or self.inflight or self.intake.incomplete or self.masters
                    or self.curves)

    def check_disk(self) -> None:
        """Pause intake when the work disk is nearly full; resume when there is room."""
        min_free = (self.cfg.daemon.min_free_disk_mb if self.min_free_disk_mb is None
                    else self.min_free_disk_mb)
        self.paused = housekeeping.check_disk(self.work, min_free, self.paused, self.log,
                                              self._resume_intake)

    def _resume_intake(self) -> None:
        self.paused = False  # before the rescan, which registers nothing while paused
        self.rescan()

    def housekeeping(self) -> None:
        """Night summaries and plots, a backup of the store and an integrity check."""
        housekeeping.housekeeping(self.store, self.work, self.log)
