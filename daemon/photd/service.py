"""``photd run``: the service around the engine (lock, signals, pool, watcher, systemd).

APScheduler's background jobs only raise flags (rescan, disk check,
housekeeping) that the main loop acts on, so every store write happens on
one thread: the main loop's.
"""

from __future__ import annotations

import concurrent.futures as cf
import fcntl
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from apscheduler.schedulers.background import BackgroundScheduler

from photd import pipeline
from photd.catalog import CatalogError, CatalogSource
from photd.config import Config
from photd.logs import configure, get_logger
from photd.scheduler import Engine, worker_count
from photd.store import Store
from photd.watcher import FolderWatcher
from photd.workdir import lock_path, store_path


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


def start_workers(pool: cf.ProcessPoolExecutor, workers: int) -> None:
    """Start every worker now (and its warm-up), not when the first frame comes."""
    for _ in range(workers):
        pool.submit(int)


def make_pool(workers: int) -> cf.ProcessPoolExecutor:
    """The worker processes, started and warmed up."""
    pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=pipeline.warm_up)
    start_workers(pool, workers)
    return pool


def renew_pool(engine: Engine) -> None:
    """Replace a broken process pool (one dead worker breaks all of it)."""
    if not engine.pool_broken or engine.inflight:
        return
    engine.pool.shutdown(wait=False, cancel_futures=True)
    engine.pool = make_pool(worker_count(engine.cfg))
    engine.pool_broken = False
    engine.log.warning("worker pool restarted", stage="pool", reason="worker_crash")


def _lock(work: Path, log: Any) -> IO | None:
    """Hold the work folder's lock for the process lifetime; None if another photd has it."""
    lock = open(lock_path(work), "w")  # noqa: SIM115 (held for the process lifetime)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        log.error("another photd is running on this work folder", stage="start",
                  reason="locked", work=str(work))
        lock.close()
        return None
    return lock


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


def run_daemon(cfg: Config, until_idle_s: float | None = None) -> int:
    """``photd run``: watch, process, record; returns the exit status."""
    configure(cfg.daemon.log_level, cfg.daemon.log_format)
    log = get_logger()
    work = cfg.work_dir
    work.mkdir(parents=True, exist_ok=True)
    lock = _lock(work, log)
    if lock is None:
        return 1
    roots = [Path(w).resolve() for w in cfg.paths.watch]
    for r in roots:
        if not r.is_dir():
            log.error("watched folder does not exist", stage="start", reason="no_folder",
                      folder=str(r))
            return 2
    catalog = _open_catalog(cfg, log)
    if catalog is None:
        return 2
    store = Store.open(store_path(work))
    flags = _Flags()

    def on_signal(signum: int, _frame: Any) -> None:
        flags.stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, lambda _s, _f: setattr(flags, "finish_when_idle", True))
    workers = worker_count(cfg)
    engine = Engine(cfg, store, make_pool(workers), log, roots=roots, catalog=catalog)
    watcher = FolderWatcher(roots, polling=cfg.daemon.observer == "polling",
                            poll_interval_s=cfg.daemon.poll_interval_s)
    watcher.start()  # before the first scan, so nothing written meanwhile is missed
    sched = _periodic_flags(cfg, flags)
    log.info("photd started", stage="start", watch=[str(r) for r in roots], work=str(work),
             workers=workers)
    engine.check_disk()
    engine.resume()
    engine.rescan()
    flags.rescan = False
    sd_notify("READY=1")
    try:
        _loop(engine, watcher, flags, until_idle_s)
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
        engine.lookups.shutdown()
        watcher.stop()
        engine.pool.shutdown(wait=True)
        log.info("photd stopped", stage="stop", counts=store.counts())
        store.close()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
    return 0


def _loop(engine: Engine, watcher: FolderWatcher, flags: _Flags,
          until_idle_s: float | None) -> None:
    """The main loop: events, flags, dispatch, results, light curves, until stopped or idle."""
    idle_since: float | None = None
    last_status = 0.0
    while not flags.stop:
        for path in watcher.drain(timeout_s=0.05 if engine.inflight or engine.curves
                                  else 0.2):
            engine.handle_path(path)
        if flags.disk_check:
            flags.disk_check = False
            engine.check_disk()
        if flags.rescan:
            flags.rescan = False
            engine.rescan()
        elif engine.intake.incomplete:
            for path in list(engine.intake.incomplete):
                engine.intake_frame(path)
        if flags.housekeeping:
            flags.housekeeping = False
            engine.housekeeping()
        renew_pool(engine)
        engine.dispatch()
        engine.flush_curves()  # after dispatch: a series with more frames running waits
        engine.collect(timeout_s=0.05)
        now = time.monotonic()
        if now - last_status > 5:
            last_status = now
            counts = engine.store.counts()
            sd_notify("WATCHDOG=1\nSTATUS=" + ", ".join(f"{k} {v}" for k, v in
                                                        sorted(counts.items())))
        if flags.finish_when_idle and until_idle_s is None:
            until_idle_s = FINISH_IDLE_S
        if until_idle_s is not None:
            if engine.idle():
                idle_since = idle_since or now
                if now - idle_since >= until_idle_s:
                    return
            else:
                idle_since = None
