"""``photd run``: the service around the engine (lock, signals, pool, watcher, systemd).

APScheduler's background jobs only raise flags (rescan, disk check,
housekeeping) that the main loop acts on, so every store write happens on
one thread: the main loop's.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler

from photd import housekeeping, pipeline
from photd.catalog import CatalogError, CatalogSource
from photd.config import Config
from photd.logs import configure, get_logger
from photd.scheduler import Engine, worker_count
from photd.store import (
    Store,
    StoreDamaged,
    StoreError,
    backup_generations,
    restore_from_backup,
)
from photd.watcher import FolderWatcher
from photd.workdir import backup_path, lock_path, store_path


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
class _Flags:
    """Raised by signals and APScheduler's jobs; acted on by the main loop."""

    rescan: bool = True
    disk_check: bool = True
    housekeeping: bool = False
    stop: bool = False
    # SIGUSR1: "the night is written, finish it": exit once idle, as --until-idle
    finish_when_idle: bool = False


#: After SIGUSR1, idle this long (s) and the daemon exits.
FINISH_IDLE_S = 3.0


#: Seconds the stop waits for the frames in hand before it ends their workers (they
#: are taken up again at the next start). Well inside systemd's WatchdogSec=120
#: and its default stop timeout of 90 s.
STOP_DEADLINE_S = 30.0
#: Seconds a broken pool may keep futures that never report before they count as lost.
BROKEN_POOL_GRACE_S = 10.0
#: Seconds between attempts to replace a pool that cannot be replaced (fork fails).
POOL_RETRY_S = 5.0
#: A lock refused for this long means another photd really runs (not workers of a
#: daemon killed a moment ago, which die with their parent).
LOCK_WAIT_S = 3.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """In a worker: end when the daemon ends, however it ends (kill -9 included).

    ``PR_SET_PDEATHSIG`` has the kernel send SIGKILL when the parent dies;
    the thread watching ``getppid()`` is the fallback where prctl is missing
    (not Linux) or was reset.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="photd-parent-watch", daemon=True).start()


def worker_init(parent_pid: int, inherited_fds: tuple[int, ...]) -> None:
    """Pool initializer: die with the daemon, drop its lock, then warm up.

    A forked worker shares the daemon's open lock descriptions; closing its
    copies means the lock goes with the daemon alone, so a restart after a
    kill -9 of the daemon is never refused because of a worker.
    """
    _die_with_parent(parent_pid)
    for fd in inherited_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    # Ctrl-C reaches the whole process group: the daemon stops in order and
    # collects the frames in hand; a worker must not die under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pipeline.warm_up()


def start_workers(pool: cf.ProcessPoolExecutor, workers: int) -> None:
    """Start every worker now (and its warm-up), not when the first frame comes."""
    for _ in range(workers):
        pool.submit(int)


def make_pool(workers: int, keep_from_workers: tuple[int, ...] = ()) -> cf.ProcessPoolExecutor:
    """The worker processes, started and warmed up; ``keep_from_workers``: fds they close."""
    pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=worker_init,
                                  initargs=(os.getpid(), keep_from_workers))
    start_workers(pool, workers)
    return pool


def end_pool(pool: cf.Executor | None, *, wait: bool) -> None:
    """Shut a pool down; without ``wait`` its workers are killed (a broken or late pool)."""
    if pool is None:
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    if wait:
        pool.shutdown(wait=True)
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.kill()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(timeout=2.0)


def renew_pool(engine: Engine, keep_from_workers: tuple[int, ...]) -> None:
    """Replace a broken process pool (one dead worker breaks all of it).

    The frames in hand come back first (each as a crash, retried up to three
    times); a future the broken pool never reports on counts as lost after
    :data:`BROKEN_POOL_GRACE_S`.
    """
    if not engine.pool_broken:
        return
    now = time.monotonic()
    since = engine.pool_broken_since or now
    if engine.inflight and now - since < BROKEN_POOL_GRACE_S:
        return
    if now - engine.pool_renewed_at < POOL_RETRY_S:
        return
    for job in engine.inflight.clear():
        engine.worker_lost(job, "the broken pool never returned it")
    end_pool(engine.pool, wait=False)
    engine.pool_renewed_at = now
    try:
        engine.pool = make_pool(worker_count(engine.cfg), keep_from_workers)
    except (OSError, cf.process.BrokenProcessPool) as exc:  # fork failed (no memory)
        engine.pool = None
        engine.log.error("worker pool cannot be restarted; retrying", stage="pool",
                         reason=type(exc).__name__, error=str(exc), retry_in_s=POOL_RETRY_S)
        return
    engine.pool_broken = False
    engine.pool_broken_since = None
    engine.log.warning("worker pool restarted", stage="pool", reason="worker_crash")


@dataclass
class WorkLock:
    """The work folder's lock, held on the folder itself and on ``photd.lock``.

    ``flock`` on the folder's descriptor: deleting ``photd.lock`` (an operator
    cleaning up) cannot let a second daemon in. Both descriptors are
    close-on-exec, and :func:`worker_init` closes them in forked workers.
    """

    fds: tuple[int, ...]

    def release(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def take_lock(work: Path, log: Any, wait_s: float = LOCK_WAIT_S) -> WorkLock | None:
    """Hold the work folder's lock for the process lifetime; None if another photd has it."""
    fds = (os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
           os.open(lock_path(work), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            for fd in fds:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fds[1], 32, 0).decode().strip()
            log.error("another photd is running on this work folder", stage="start",
                      reason="locked", work=str(work), pid=holder or None)
            for fd in fds:
                os.close(fd)
            return None
    with contextlib.suppress(OSError):  # for an operator: who holds it
        os.ftruncate(fds[1], 0)
        os.pwrite(fds[1], f"{os.getpid()}\n".encode(), 0)
    return WorkLock(fds)


def _open_catalog(cfg: Config, log: Any) -> CatalogSource | None:
    """The reference catalog; None when the configured file is unusable."""
    catalog = CatalogSource(cfg.catalog, cfg.work_dir, local_file=cfg.paths.catalog or None)
    if cfg.paths.catalog and not Path(cfg.paths.catalog).exists():
        log.warning("reference catalog file not there yet; science frames wait for it",
                    stage="start", reason="catalog_unavailable", catalog=cfg.paths.catalog)
    elif cfg.paths.catalog:
        try:
            catalog.stars(0.0, 0.0, 0.1)  # reads and checks the file once, at start-up
        except CatalogError as exc:
            log.error("reference catalog unusable", stage="start", reason="bad_catalog",
                      error=str(exc))
            return None
    return catalog


def _periodic_flags(cfg: Config, flags: _Flags) -> BackgroundScheduler:
    sched = BackgroundScheduler(daemon=True)
    sched.add_job(lambda: setattr(flags, "rescan", True), "interval",
                  seconds=cfg.daemon.rescan_interval_s)
    sched.add_job(lambda: setattr(flags, "disk_check", True), "interval", seconds=15)
    sched.add_job(lambda: setattr(flags, "housekeeping", True), "interval", hours=1)
    sched.start()
    return sched


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class Fault:
    """What an error in the main loop means: its reason, and whether to stop (exit 1)."""

    reason: str
    fatal: bool
    retry_limit: int | None = None  # consecutive faults tolerated; None: retry for ever


#: Consecutive unexpected errors after which the daemon stops rather than spins.
UNEXPECTED_LIMIT = 5


def classify_fault(exc: BaseException) -> Fault:
    """The store's and the disk's errors, by what an operator must do about them.

    A full disk and a lock held by another process pass (retry, logged); a
    read-only or damaged store does not (stop with exit 1: a restart checks
    the store, restores it from a backup if it is damaged).
    """
    text = str(exc).lower()
    if isinstance(exc, StoreDamaged):
        return Fault("store_damaged", True)
    if isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == sqlite3.SQLITE_FULL or "disk is full" in text:
            return Fault("disk_full", False)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "is locked" in text:
            return Fault("store_busy", False)
        if code == sqlite3.SQLITE_READONLY or "readonly" in text:
            return Fault("store_readonly", True)
        if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or "malformed" in text:
            return Fault("store_damaged", True)
        if code == sqlite3.SQLITE_CANTOPEN:
            return Fault("store_unavailable", True)
        if code == sqlite3.SQLITE_IOERR:
            return Fault("store_io_error", False, UNEXPECTED_LIMIT * 4)
        return Fault("store_error", False, UNEXPECTED_LIMIT)
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return Fault("disk_full", False)
        if exc.errno == errno.EROFS:
            return Fault("work_readonly", True)
        return Fault("os_error", False, UNEXPECTED_LIMIT * 4)
    return Fault(type(exc).__name__, False, UNEXPECTED_LIMIT)


def open_store(work: Path, log: Any) -> Store | None:
    """The store, checked; a damaged one is restored from the newest good backup.

    Policy (README, "A damaged store"): the damaged file is kept aside as
    ``photd.sqlite.damaged-<UTC>`` and the newest backup that passes
    ``PRAGMA quick_check`` takes its place; frames finished after that backup
    are processed again (raw files are intact, re-processing replaces). With
    no good backup the daemon refuses to start, naming the file.
    """
    path = store_path(work)
    backups = backup_generations(backup_path(work))
    try:
        try:
            return Store.open(path, backups=backups)
        except StoreDamaged as exc:
            restored = restore_from_backup(path, exc.backups)
            if restored is None:
                log.error("store damaged and no good backup to restore: not starting",
                          stage="start", reason="store_damaged", store=str(path),
                          error=exc.problem.splitlines()[0][:300],
                          backups=[str(b) for b in backups],
                          hint="move the damaged file aside to start an empty store "
                               "(the raw frames are processed again)")
                return None
            used, aside = restored
            log.error("store damaged: restored from the newest good backup; frames "
                      "finished since are processed again", stage="start",
                      reason="store_damaged", store=str(path), backup=str(used),
                      damaged_copy=str(aside), error=exc.problem.splitlines()[0][:300])
            return Store.open(path, backups=backups)
    except (StoreError, sqlite3.Error, OSError) as exc:
        fault = classify_fault(exc)
        log.error("store cannot be opened: not starting", stage="start",
                  reason=fault.reason if fault.reason != "StoreError" else "store_error",
                  store=str(path), error=str(exc))
        return None


# --------------------------------------------------------------------------- the daemon


def run_daemon(cfg: Config, until_idle_s: float | None = None) -> int:
    """``photd run``: watch, process, record; returns the exit status."""
    configure(cfg.daemon.log_level, cfg.daemon.log_format)
    log = get_logger()
    work = cfg.work_dir
    try:
        work.mkdir(parents=True, exist_ok=True)
        lock = take_lock(work, log)
    except OSError as exc:
        log.error("work folder unusable", stage="start", reason=classify_fault(exc).reason,
                  work=str(work), error=str(exc))
        return 1
    if lock is None:
        return 1
    try:
        return _run_locked(cfg, until_idle_s, log, lock)
    finally:
        lock.release()


def _run_locked(cfg: Config, until_idle_s: float | None, log: Any, lock: WorkLock) -> int:
    work = cfg.work_dir
    roots = [Path(w).resolve() for w in cfg.paths.watch]
    for r in roots:
        if not r.is_dir():
            log.error("watched folder does not exist", stage="start", reason="no_folder",
                      folder=str(r))
            return 2
    catalog = _open_catalog(cfg, log)
    if catalog is None:
        return 2
    store = open_store(work, log)
    if store is None:
        return 1
    flags = _Flags()

    def on_signal(signum: int, _frame: Any) -> None:
        flags.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda _s, _f: setattr(flags, "finish_when_idle", True))
    workers = worker_count(cfg)
    state = _LoopState()

    def heartbeat() -> bool:
        """Long steps call this: systemd hears from us, and a stop is seen at once."""
        now = time.monotonic()
        if now - state.last_beat > 5:
            state.last_beat = now
            sd_notify("WATCHDOG=1")
        return flags.stop

    engine = Engine(cfg, store, make_pool(workers, lock.fds), log, roots=roots,
                    catalog=catalog, heartbeat=heartbeat)
    engine.min_free_disk_mb = housekeeping.sane_disk_threshold(
        work, cfg.daemon.min_free_disk_mb, log)
    watcher = FolderWatcher(roots, polling=cfg.daemon.observer == "polling",
                            poll_interval_s=cfg.daemon.poll_interval_s)
    problem = watcher.start()  # before the first scan, so nothing written meanwhile is missed
    if problem:
        log.warning("folder events unavailable: relying on rescans", stage="watch",
                    reason="watcher_down", error=problem,
                    rescan_every_s=cfg.daemon.poll_interval_s)
        state.watcher_warned = True
    sched = _periodic_flags(cfg, flags)
    log.info("photd started", stage="start", watch=[str(r) for r in roots], work=str(work),
             workers=workers)
    status = 0
    try:
        try:
            engine.check_disk()
            engine.resume()
            engine.rescan()
        except Exception as exc:  # noqa: BLE001 - the loop's fault handling takes over
            state.pending = exc
        flags.rescan = False
        state.last_rescan = time.monotonic()
        sd_notify("READY=1")
        status = _loop(engine, watcher, flags, until_idle_s, state, lock.fds)
    finally:
        sd_notify("STOPPING=1")
        _stop(engine, flags, status == 0)
        sched.shutdown(wait=False)
        watcher.stop()
        with contextlib.suppress(Exception):
            log.info("photd stopped", stage="stop", counts=store.counts(), exit_code=status)
        if status == 0 and not flags.stop:
            summary = engine.waiting_for_log_summary()
            if summary:
                print(f"photd: {summary}", file=sys.stderr)
        with contextlib.suppress(Exception):
            store.close()
    return status


def _stop(engine: Engine, flags: _Flags, clean: bool) -> None:
    """Finish the frames in hand (their results are recorded), start nothing new.

    Bounded by :data:`STOP_DEADLINE_S`: frames still running then are killed
    with their workers and taken up again at the next start (they stay
    ``processing`` in the store, which resume() re-queues).
    """
    engine.queue.clear()
    deadline = time.monotonic() + STOP_DEADLINE_S
    try:
        while engine.inflight and time.monotonic() < deadline:
            if engine.pool_broken and time.monotonic() - (
                    engine.pool_broken_since or 0) > BROKEN_POOL_GRACE_S:
                break
            engine.collect(timeout_s=1.0)
            sd_notify("WATCHDOG=1")
        engine.flush_curves(force=True)
        if clean and not flags.stop:
            engine.housekeeping()  # the night is processed (--until-idle): summarise it
    except Exception as exc:  # noqa: BLE001 - a stop must end, whatever the store says
        engine.log.error("stop: results not recorded; taken up at the next start",
                         stage="stop", reason=classify_fault(exc).reason, error=str(exc))
    engine.lookups.shutdown()
    end_pool(engine.pool, wait=not engine.inflight and not engine.pool_broken)


@dataclass
class _LoopState:
    idle_since: float | None = None
    last_status: float = 0.0
    last_beat: float = 0.0
    last_rescan: float = 0.0
    watcher_warned: bool = False
    faults: int = 0
    fault_reason: str | None = None
    pending: BaseException | None = None  # raised before the loop (start-up rescan)
    recover: bool = False


def _loop(engine: Engine, watcher: FolderWatcher, flags: _Flags, until_idle_s: float | None,
          state: _LoopState, keep_from_workers: tuple[int, ...]) -> int:
    """The main loop until stopped (0), idle (0), or stopped by a fault (1).

    An error in a step is a fault (:func:`classify_fault`): logged with its
    reason, retried after a growing pause (the queue is rebuilt from the
    store, which is the journal), or a clean stop with exit code 1.
    """
    log = engine.log
    while not flags.stop:
        try:
            if state.pending is not None:
                exc, state.pending = state.pending, None
                raise exc
            if state.recover:
                engine.recover()
                state.recover = False
            if _step(engine, watcher, flags, until_idle_s, state, keep_from_workers):
                return 0
            if state.fault_reason:
                log.warning("fault cleared: going on", stage="loop", reason=state.fault_reason,
                            faults=state.faults)
                state.faults, state.fault_reason = 0, None
        except Exception as exc:  # noqa: BLE001 - every error becomes an event with a reason
            fault = classify_fault(exc)
            state.faults += 1
            state.fault_reason = fault.reason
            detail = str(exc) or type(exc).__name__
            if fault.fatal or (fault.retry_limit is not None
                               and state.faults > fault.retry_limit):
                log.error("stopping on a fault", stage="loop", reason=fault.reason,
                          error=detail, exit_code=1, faults=state.faults,
                          trace=traceback.format_exc(limit=8) if not isinstance(
                              exc, sqlite3.Error | OSError) else None)
                return 1
            delay = min(30.0, 0.5 * 2 ** min(state.faults - 1, 6))
            log.error("fault in the main loop: retrying", stage="loop", reason=fault.reason,
                      error=detail, retry_in_s=delay, attempt=state.faults,
                      trace=traceback.format_exc(limit=8) if not isinstance(
                          exc, sqlite3.Error | OSError) else None)
            _pause(flags, delay)
            state.recover = True
            flags.rescan = True  # events drained before the fault may be lost
    return 0


def _pause(flags: _Flags, seconds: float) -> None:
    """Sleep, still answering systemd's watchdog and a stop."""
    end = time.monotonic() + seconds
    while not flags.stop and time.monotonic() < end:
        sd_notify("WATCHDOG=1")
        time.sleep(min(0.2, max(0.0, end - time.monotonic())))


def _step(engine: Engine, watcher: FolderWatcher, flags: _Flags, until_idle_s: float | None,
          state: _LoopState, keep_from_workers: tuple[int, ...]) -> bool:
    """One pass of the loop: events, flags, dispatch, results, light curves; True: idle."""
    cfg = engine.cfg
    for path in watcher.drain(timeout_s=0.05 if engine.inflight or engine.curves else 0.2):
        engine.handle_path(path)
        if engine.heartbeat():
            return False
    now = time.monotonic()
    if not watcher.alive():
        if not state.watcher_warned:
            state.watcher_warned = True
            engine.log.warning("folder events stopped: relying on rescans", stage="watch",
                               reason="watcher_down", error=watcher.problem,
                               rescan_every_s=cfg.daemon.poll_interval_s)
        if now - state.last_rescan >= cfg.daemon.poll_interval_s:
            flags.rescan = True
    if flags.disk_check:
        flags.disk_check = False
        engine.check_disk()
    if flags.rescan:
        flags.rescan = False
        state.last_rescan = now
        engine.rescan()
    elif engine.intake.incomplete:
        for path in list(engine.intake.incomplete):
            engine.intake_frame(path)
    if flags.housekeeping:
        flags.housekeeping = False
        engine.housekeeping()
    renew_pool(engine, keep_from_workers)
    engine.dispatch()
    engine.flush_curves()  # after dispatch: a series with more frames running waits
    engine.collect(timeout_s=0.05)
    now = time.monotonic()
    if now - state.last_status > 5:
        state.last_status = state.last_beat = now
        counts = engine.store.counts()
        sd_notify("WATCHDOG=1\nSTATUS=" + ", ".join(f"{k} {v}" for k, v in
                                                    sorted(counts.items())))
    if engine.idle():
        if state.idle_since is None:
            state.idle_since = now
            engine.went_idle()
        if until_idle_s is None and flags.finish_when_idle:
            until_idle_s = FINISH_IDLE_S
        if until_idle_s is not None and now - state.idle_since >= until_idle_s:
            return True
    else:
        state.idle_since = None
    return False
