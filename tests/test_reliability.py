"""Faults that used to stop the night (issue 21), each on real processes where it can be.

One small simulated night is processed once undisturbed (the reference);
every fault below is then played against the same night, and the night must
end with the same frame states and the same measurement and light-curve rows:
every frame processed exactly once. Faults the daemon cannot be made to meet
from outside (a COMMIT refused for a full disk, a store write that fails for
a frame's own data) are played in-process on the real store.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon_config import write_config
from night_rows import assert_same_night, store_rows
from photd.simulate import SimOptions, load_truth, simulate_night

TINY = SimOptions(seed=5, small=True, science_per_target=3, n_bias=4, n_flat=4, n_dark=0)


# --------------------------------------------------------------------------- helpers


def _photd(cfg: Path, *args: str, **kw) -> subprocess.Popen:
    log = open(cfg.parent / "daemon.log", "a")  # noqa: SIM115 - closed by the OS at exit
    return subprocess.Popen([sys.executable, "-m", "photd.cli", "run", "--config", str(cfg),
                             *args], stdout=subprocess.DEVNULL, stderr=log, **kw)


def _log(cfg: Path) -> str:
    return (cfg.parent / "daemon.log").read_text(errors="replace")


def _events(cfg: Path) -> list[dict]:
    return [json.loads(line) for line in _log(cfg).splitlines() if line.startswith("{")]


def _setup(tmp: Path, night: Path, name: str, **daemon: object) -> Path:
    folder = tmp / name
    folder.mkdir()
    return write_config(folder / "photd.toml", night, folder / "work", **daemon)


def _states(db: Path) -> dict[str, str]:
    if not db.exists():
        return {}
    try:
        con = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=1)
        try:
            return dict(con.execute("SELECT path, state FROM frames").fetchall())
        finally:
            con.close()
    except sqlite3.Error:
        return {}


def _children(pid: int) -> set[int]:
    """Processes whose parent is ``pid`` (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.add(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _figure(fault: str, **numbers: float) -> None:
    """One line per fault for the campaign's table (seen with ``pytest -s``)."""
    print(f"\nFIGURE {fault}: " + ", ".join(f"{k}={v:.2f}" for k, v in numbers.items()))


def _wait_for(cond, timeout: float, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(step)
    return None


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rel_night")
    simulate_night(out, TINY)
    return out


@pytest.fixture(scope="module")
def reference(night: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The night processed once, undisturbed."""
    cfg = _setup(tmp_path_factory.mktemp("calm"), night, "calm")
    t0 = time.monotonic()
    p = _photd(cfg, "--until-idle", "3")
    assert p.wait(timeout=600) == 0, _log(cfg)[-3000:]
    _figure("none (reference night)", night_s=time.monotonic() - t0)
    return {"rows": store_rows(cfg.parent / "work"), "work": cfg.parent / "work"}


# --------------------------------------------------------------------------- processes


def test_kill_9_of_the_main_process_alone_leaves_no_orphan_and_a_restart_runs(
        tmp_path, night, reference):
    cfg = _setup(tmp_path, night, "k9")
    db = cfg.parent / "work" / "photd.sqlite"
    p = _photd(cfg, start_new_session=True)
    assert _wait_for(lambda: "processing" in _states(db).values()
                     or "calibration" in _states(db).values(), 120)
    workers = _children(p.pid)
    assert workers, "the daemon has no workers to orphan"
    os.kill(p.pid, signal.SIGKILL)  # the main process alone, not its group
    p.wait(timeout=30)
    killed_at = time.monotonic()
    again = _photd(cfg, "--until-idle", "3")
    gone = _wait_for(lambda: not any(_alive(w) for w in workers), 10)
    orphans_lived_s = time.monotonic() - killed_at
    assert gone, f"workers {workers} outlived the daemon"
    assert again.wait(timeout=600) == 0, _log(cfg)[-3000:]
    _figure("kill -9 main", orphans_gone_s=orphans_lived_s,
            night_after_restart_s=time.monotonic() - killed_at)
    assert "another photd is running" not in _log(cfg)
    assert orphans_lived_s < 5
    assert_same_night(store_rows(cfg.parent / "work"), reference["rows"])


def test_a_worker_killed_while_calibrations_dispatch_leaves_the_night_whole(
        tmp_path, night, reference):
    cfg = _setup(tmp_path, night, "oom")
    db = cfg.parent / "work" / "photd.sqlite"
    p = _photd(cfg, "--until-idle", "3")
    calibration = {str(night / "raw" / f["path"]) for f in load_truth(night).frames()
                   if f["kind"] in ("bias", "flat")}

    def calibration_in_hand() -> bool:
        states = _states(db)
        return any(states.get(c) == "processing" for c in calibration)

    # A calibration frame in a worker's hand, else (a fast machine) any frame.
    hit = _wait_for(calibration_in_hand, 60, step=0.005) or _wait_for(
        lambda: "processing" in _states(db).values(), 60, step=0.005)
    assert hit
    victim = sorted(_children(p.pid))[0]
    os.kill(victim, signal.SIGKILL)  # what the OOM killer does
    t0 = time.monotonic()
    assert p.wait(timeout=600) == 0, _log(cfg)[-3000:]
    events = _events(cfg)
    crash = next(e["timestamp"] for e in events if e.get("event") == "worker crashed")
    renewed = next(e["timestamp"] for e in events if e.get("event") == "worker pool restarted")
    _figure("worker SIGKILL", pool_back_s=_seconds(renewed) - _seconds(crash),
            rest_of_night_s=time.monotonic() - t0)
    assert any(e.get("event") == "worker pool restarted" for e in events)
    assert_same_night(store_rows(cfg.parent / "work"), reference["rows"])


def test_sigterm_right_after_a_worker_died_stops_the_daemon_at_once(tmp_path, night):
    cfg = _setup(tmp_path, night, "term")
    db = cfg.parent / "work" / "photd.sqlite"
    p = _photd(cfg)
    assert _wait_for(lambda: "processing" in _states(db).values(), 120, step=0.005)
    os.kill(sorted(_children(p.pid))[0], signal.SIGKILL)
    time.sleep(0.3)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(timeout=120)
    stop_s = time.monotonic() - t0
    assert rc == 0, _log(cfg)[-3000:]
    _figure("SIGTERM after a worker died", stop_s=stop_s)
    assert stop_s < 35, f"stop took {stop_s:.1f} s"  # STOP_DEADLINE_S + pool teardown
    assert not _children(p.pid)


def test_a_store_lock_held_by_another_process_and_a_deleted_lock_file(
        tmp_path, night, reference):
    cfg = _setup(tmp_path, night, "busy")
    work = cfg.parent / "work"
    db = work / "photd.sqlite"
    p = _photd(cfg, "--until-idle", "3")
    assert _wait_for(lambda: len(_states(db)) >= 3, 120)
    # An operator's tool takes the write lock for longer than the busy timeout (5 s).
    other = sqlite3.connect(db, isolation_level=None, timeout=30)
    other.execute("BEGIN EXCLUSIVE")
    # Meanwhile someone deletes photd.lock and starts a second daemon.
    (work / "photd.lock").unlink()
    second = _photd(cfg, "--until-idle", "1")
    assert second.wait(timeout=60) == 1
    time.sleep(8)
    other.execute("COMMIT")
    other.close()
    assert p.wait(timeout=600) == 0, _log(cfg)[-3000:]
    events = _events(cfg)
    refused = [e for e in events if e.get("reason") == "locked"]
    assert refused and refused[0]["event"] == "another photd is running on this work folder"
    busy = [e for e in events if e.get("reason") == "store_busy"]
    cleared = next(e for e in busy if e["event"] == "fault cleared: going on")
    _figure("store lock held 8 s", retries=len(busy) - 1,
            fault_to_cleared_s=_seconds(cleared["timestamp"]) - _seconds(busy[0]["timestamp"]))
    assert busy and busy[0]["event"] == "fault in the main loop: retrying"
    assert busy[0]["retry_in_s"] > 0
    assert_same_night(store_rows(work), reference["rows"])


# --------------------------------------------------------------------------- the store


def _damage(db: Path) -> None:
    """Overwrite the second half of the file's pages with garbage."""
    size = db.stat().st_size
    with open(db, "r+b") as fh:
        fh.seek(4096 * 2)
        fh.write(os.urandom(max(4096, size // 2 - 8192)))


def test_a_damaged_store_is_restored_from_the_newest_good_backup(tmp_path, reference):
    work = tmp_path / "work"
    shutil.copytree(reference["work"], work)
    night_raw = next(iter(reference["rows"]["states"])).split("/raw/")[0]
    cfg = write_config(tmp_path / "photd.toml", Path(night_raw), work)
    backup = work / "backup" / "photd.sqlite.bak"
    assert backup.exists()
    _damage(work / "photd.sqlite")
    t0 = time.monotonic()
    p = _photd(cfg, "--until-idle", "2")
    assert p.wait(timeout=600) == 0, _log(cfg)[-3000:]
    recovery_s = time.monotonic() - t0
    restored = [e for e in _events(cfg) if e.get("reason") == "store_damaged"]
    assert restored and restored[0]["backup"] == str(backup)
    assert Path(restored[0]["damaged_copy"]).exists()  # kept aside, never deleted
    assert_same_night(store_rows(work), reference["rows"])
    _figure("damaged store, good backup", start_to_night_done_s=recovery_s)
    assert recovery_s < 120


def test_a_damaged_store_without_a_good_backup_is_refused_naming_the_file(
        tmp_path, reference):
    work = tmp_path / "work"
    shutil.copytree(reference["work"], work)
    shutil.rmtree(work / "backup")
    night_raw = next(iter(reference["rows"]["states"])).split("/raw/")[0]
    cfg = write_config(tmp_path / "photd.toml", Path(night_raw), work)
    _damage(work / "photd.sqlite")
    damaged = (work / "photd.sqlite").read_bytes()
    p = _photd(cfg, "--until-idle", "1")
    assert p.wait(timeout=120) == 1
    refused = [e for e in _events(cfg) if e.get("reason") == "store_damaged"]
    assert refused and refused[0]["store"] == str(work / "photd.sqlite")
    assert "not starting" in refused[0]["event"]
    assert (work / "photd.sqlite").read_bytes() == damaged  # untouched


def test_backups_rotate_and_a_damaged_store_never_replaces_a_good_one(tmp_path):
    from photd.store import Store, StoreDamaged, backup_generations, check_file

    store = Store.open(tmp_path / "photd.sqlite")
    dest = tmp_path / "backup" / "photd.sqlite.bak"
    for n in range(4):
        store.upsert_frame(f"/raw/{n}.fits", size=1, mtime=1.0, sha256=str(n), band="g",
                           frame_number=n, night="2016-11-01", closed_at=1.0)
        store.backup(dest)
    assert [check_file(b) for b in backup_generations(dest)] == ["ok"] * 3
    store.close()
    good = dest.read_bytes()
    _damage(tmp_path / "photd.sqlite")
    with pytest.raises(StoreDamaged):
        store = Store.open(tmp_path / "photd.sqlite")
        store.backup(dest)
    assert dest.read_bytes() == good


def test_housekeeping_writes_no_backup_through_a_planted_link(tmp_path):
    from photd.housekeeping import housekeeping
    from photd.logs import get_logger
    from photd.store import Store

    work = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    store = Store.open(work / "photd.sqlite")
    (work / "backup").symlink_to(elsewhere)
    housekeeping(store, work, get_logger())  # logs an error, does not raise
    store.close()
    assert list(elsewhere.iterdir()) == []


# --------------------------------------------------------------------------- inputs


def _replace_card(blob: bytes, key: str, card: str) -> bytes:
    pad = key.ljust(8).encode()
    for at in range(0, blob.index(b"END" + b" " * 77) + 80, 80):
        if blob[at:at + 8] == pad:
            return blob[:at] + card.ljust(80).encode("ascii") + blob[at + 80:]
    raise KeyError(key)


@pytest.fixture
def hostile_night(tmp_path: Path, night: Path):
    """The night, plus names, numbers, nesting and headers nobody's camera writes."""
    copy = tmp_path / "night"
    shutil.copytree(night, copy)
    g = copy / "raw" / "g"
    base = (g / "xl126g_0010.fits").read_bytes()
    bad_name = os.fsencode(g) + b"/xl126g_\xff\xfe.fits"
    with open(bad_name, "wb") as fh:
        fh.write(base)
    huge = fits.Card("FRAMENUM", 10**20).image
    (g / "xl126g_0901.fits").write_bytes(_replace_card(base, "FRAMENUM", huge))
    no_key = _replace_card(base, "FRAMENUM", "COMMENT frame number card removed")
    (g / f"xl126g_{'9' * 30}.fits").write_bytes(no_key)
    cards = ("COMMENT " + "x" * 72) * 36  # one block of comments, no END
    (g / "xl126g_0902.fits").write_bytes((fits.Card("SIMPLE", True).image
                                          + cards[80:]).encode() + cards.encode() * 210)
    # a float camera's dead pixels, in a frame the log covers
    victim = copy / "raw" / "r" / "xl126r_0011.fits"
    with fits.open(victim) as hdul:
        data = hdul[0].data.astype(np.float32)
        header = hdul[0].header.copy()
    data[:6, :6] = np.nan
    data[-3:, -3:] = np.inf
    for key in ("BZERO", "BSCALE"):
        header.remove(key, ignore_missing=True)
    fits.PrimaryHDU(data, header).writeto(victim, overwrite=True)
    here = g / "deep"
    here.mkdir()
    for _ in range(1100):
        here = here / "d"
        here.mkdir()
    (here / "xl126g_0903.fits").write_bytes(base)
    yield copy, bad_name
    while here != g:  # no recursion: pytest's clean-up would hit the recursion limit
        for child in here.iterdir():
            child.unlink()
        here.rmdir()
        here = here.parent


def test_names_numbers_nesting_and_headers_nobody_writes_are_states_at_every_start(
        tmp_path, hostile_night):
    copy, bad_name = hostile_night
    cfg = _setup(tmp_path, copy, "names")
    work = cfg.parent / "work"
    for run in range(2):
        p = _photd(cfg, "--until-idle", "2")
        assert p.wait(timeout=600) == 0, _log(cfg)[-3000:]
        if run == 0:
            con = sqlite3.connect(work / "photd.sqlite")
            history = con.execute("SELECT count(*) FROM state_log").fetchone()[0]
            con.close()
    assert "Traceback" not in _log(cfg)
    con = sqlite3.connect(work / "photd.sqlite")
    try:
        frames = {p: (s, r) for p, s, r in con.execute("SELECT path, state, reason FROM frames")}
        # the second start found nothing new to say about any of them
        assert con.execute("SELECT count(*) FROM state_log").fetchone()[0] == history
    finally:
        con.close()
    g = copy / "raw" / "g"
    printable = os.fsencode(bad_name).decode("utf-8", errors="backslashreplace")
    assert frames[printable] == ("failed", "bad_name")
    assert frames[str(g / "xl126g_0901.fits")] == ("failed", "bad_frame_number")
    assert frames[str(g / f"xl126g_{'9' * 30}.fits")] == ("failed", "bad_frame_number")
    assert frames[str(g / "xl126g_0902.fits")] == ("failed", "header_too_large")
    assert frames[str(copy / "raw" / "r" / "xl126r_0011.fits")][0] == "done"  # NaNs masked
    assert not any("deep" in p for p in frames)  # past the depth limit: not looked into
    too_deep = [e for e in _events(cfg) if e.get("reason") == "too_deep"]
    assert len(too_deep) == 2  # once per start
    good = {p: s for p, (s, _) in frames.items() if "xl126g_09" not in p
            and "xl126g_\\x" not in p and "9" * 30 not in p}
    truth = load_truth(copy)
    assert len(good) == len(truth.frames())


def test_a_flood_of_junk_files_neither_freezes_the_loop_nor_delays_a_stop(
        tmp_path, night, reference):
    copy = tmp_path / "night"
    shutil.copytree(night, copy)
    cfg = _setup(tmp_path, copy, "flood")
    junk = copy / "raw" / "r"
    p = _photd(cfg, "--until-idle", "3")

    def flood(start: int, n: int) -> None:
        for k in range(start, start + n):
            (junk / f"note_{k:05d}.txt").write_text(f"camera chatter {k}\n")

    t0 = time.monotonic()
    writer = threading.Thread(target=flood, args=(0, 3000))
    writer.start()
    writer.join()
    assert p.wait(timeout=600) == 0, _log(cfg)[-3000:]
    night_s = time.monotonic() - t0
    got = store_rows(cfg.parent / "work")
    ref = reference["rows"]
    assert {k.replace(str(copy), "N"): v for k, v in got["states"].items()} == \
        {k.replace(str(night), "N"): v for k, v in ref["states"].items()}
    assert len(got["measurements"]) == len(ref["measurements"])
    _figure("3000 junk files", night_s=night_s)
    assert night_s < 300
    # and a stop asked for in the middle of a second flood is heard at once
    p = _photd(cfg)
    time.sleep(4)
    writer = threading.Thread(target=flood, args=(3000, 3000))
    writer.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    stop_s = time.monotonic() - t0
    writer.join()
    _figure("SIGTERM during a flood", stop_s=stop_s)
    assert stop_s < 15, f"stop took {stop_s:.1f} s"


# --------------------------------------------------------------------------- in-process


NIGHT = "2016-11-01"


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _engine(tmp_path: Path, roots=(), catalog_file: Path | None = None):
    from photd.catalog import CatalogSource
    from photd.config import Config, with_overrides
    from photd.logs import get_logger
    from photd.scheduler import Engine
    from photd.store import Store

    store = Store.open(tmp_path / "work" / "photd.sqlite")
    cfg = with_overrides(Config(), paths={"work": str(tmp_path / "work")})
    catalog = (CatalogSource(cfg.catalog, cfg.work_dir, local_file=str(catalog_file))
               if catalog_file else None)
    return Engine(cfg, store, None, get_logger(), roots=list(roots), catalog=catalog)


def _frame(store, path: str, number: int, sha: str = "abc") -> int:
    fid, _ = store.upsert_frame(path, size=100, mtime=1.0, sha256=sha, band="g",
                                frame_number=number, night=NIGHT, closed_at=1.0)
    return fid


def _real_disk_full() -> sqlite3.OperationalError:
    """The error SQLite really raises when the disk is full."""
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE t (x BLOB)")
    con.execute("PRAGMA max_page_count = 3")
    try:
        con.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        return exc
    raise AssertionError("no SQLITE_FULL")


def test_a_store_write_that_fails_ends_that_frame_only(tmp_path, monkeypatch):
    import concurrent.futures as cf

    from photd.frame_queue import ScienceJob
    from photd.pipeline import FrameResult

    engine = _engine(tmp_path)
    store = engine.store
    bad, good = _frame(store, "/raw/g_0005.fits", 5), _frame(store, "/raw/g_0006.fits", 6)
    for fid in (bad, good):
        store.set_state(fid, "processing")
    real = store.finish_frame

    def finish(fid, **kw):
        if fid == bad:  # what a target measured twice under one id did (issue 15)
            raise sqlite3.IntegrityError("UNIQUE constraint failed: measurements.frame_id")
        return real(fid, **kw)

    monkeypatch.setattr(store, "finish_frame", finish)
    for fid in (bad, good):
        fut: cf.Future = cf.Future()
        fut.set_result(FrameResult(fid, "badfit", reason="too_few_matches"))
        engine.inflight.add(fut, ScienceJob(fid, NIGHT, "g", "OJ287", "v1", "abc"))
    engine.collect(timeout_s=0)
    engine.collect(timeout_s=0)
    assert store.frame(bad)["state"] == "failed"
    assert store.frame(bad)["reason"].startswith("IntegrityError: UNIQUE constraint failed")
    # the other frame's result is stored (then re-queued: "v1" are not today's masters)
    assert "badfit" in [h["state"] for h in store.state_history(good)]


def test_a_full_disk_while_storing_is_the_loops_fault_and_the_frame_comes_back(
        tmp_path, monkeypatch):
    import concurrent.futures as cf

    from photd.frame_queue import ScienceJob
    from photd.pipeline import FrameResult
    from photd.service import classify_fault

    engine = _engine(tmp_path)
    store = engine.store
    fid = _frame(store, "/raw/g_0005.fits", 5)
    store.set_state(fid, "processing", kind="object", target="OJ287")
    full = _real_disk_full()

    def finish(*_a, **_kw):
        raise full

    monkeypatch.setattr(store, "finish_frame", finish)
    fut: cf.Future = cf.Future()
    fut.set_result(FrameResult(fid, "badfit", reason="too_few_matches"))
    engine.inflight.add(fut, ScienceJob(fid, NIGHT, "g", "OJ287", "v1", "abc"))
    with pytest.raises(sqlite3.OperationalError) as err:
        engine.collect(timeout_s=0)
    assert classify_fault(err.value).reason == "disk_full"
    assert not classify_fault(err.value).fatal
    assert store.frame(fid)["state"] == "processing"  # not the frame's fault
    monkeypatch.undo()
    engine.recover()  # what the loop does before it retries
    assert store.frame(fid)["state"] == "waiting_log"  # classified again (this test has no log)


def test_a_write_refused_for_a_full_disk_leaves_the_store_usable(tmp_path):
    from photd.store import Store

    store = Store.open(tmp_path / "photd.sqlite")
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages + 1}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        _frame(store, "/raw/" + "x" * 200_000, 1)
    assert not store.conn.in_transaction
    store.conn.execute("PRAGMA max_page_count = 1073741823")  # room again
    _frame(store, "/raw/g_0001.fits", 1)  # the next write goes through
    store.close()


def test_faults_by_what_an_operator_must_do(tmp_path):
    import errno

    from photd.service import classify_fault
    from photd.store import Store

    store = Store.open(tmp_path / "photd.sqlite")
    store.conn.execute("PRAGMA query_only = ON")  # what a read-only file gives
    with pytest.raises(sqlite3.OperationalError) as ro:
        _frame(store, "/raw/g_0001.fits", 1)
    store.close()
    assert classify_fault(ro.value) == classify_fault(ro.value).__class__("store_readonly", True)
    assert classify_fault(_real_disk_full()).reason == "disk_full"
    assert classify_fault(OSError(errno.ENOSPC, "No space")).reason == "disk_full"
    assert classify_fault(OSError(errno.EROFS, "Read-only")).fatal
    assert classify_fault(sqlite3.OperationalError("database is locked")).reason == "store_busy"


def test_a_frame_that_vanished_under_a_worker_is_taken_again_when_it_comes_back(
        tmp_path, night):
    import concurrent.futures as cf

    from photd.frame_queue import CalibrationJob
    from photd.pipeline import FrameResult
    from photd.watcher import sha256_of

    raw = tmp_path / "raw" / "g"
    raw.mkdir(parents=True)
    path = raw / "xl126g_0001.fits"
    shutil.copy(night / "raw" / "g" / "xl126g_0001.fits", path)
    engine = _engine(tmp_path, roots=[tmp_path / "raw"])
    fid = engine.intake.register(path, queued=())
    engine.store.set_state(fid, "processing")
    blob = path.read_bytes()
    path.unlink()  # gone while the worker reads it
    fut: cf.Future = cf.Future()
    fut.set_result(FrameResult(fid, "failed", reason="unreadable"))
    engine.inflight.add(fut, CalibrationJob(fid, NIGHT, "g", "bias", sha256_of_bytes(blob)))
    engine.collect(timeout_s=0)
    assert (engine.store.frame(fid)["state"], engine.store.frame(fid)["reason"]) == (
        "failed", "vanished")
    path.write_bytes(blob)  # the same bytes come back
    assert engine.intake.register(path, queued=()) is None  # settling (a new mtime)
    time.sleep(engine.cfg.daemon.settle_s + 0.1)
    assert engine.intake.register(path, queued=()) == fid
    assert engine.store.frame(fid)["state"] == "arrived"
    assert engine.store.frame(fid)["sha256"] == sha256_of(path)


def sha256_of_bytes(blob: bytes) -> str:
    import hashlib

    return hashlib.sha256(blob).hexdigest()


def test_a_growing_file_is_hashed_once_it_stops_growing(tmp_path, night):
    raw = tmp_path / "raw" / "g"
    raw.mkdir(parents=True)
    path = raw / "xl126g_0001.fits"
    shutil.copy(night / "raw" / "g" / "xl126g_0001.fits", path)
    engine = _engine(tmp_path, roots=[tmp_path / "raw"])
    fid = engine.intake.register(path, queued=())
    history = len(engine.store.state_history(fid))
    for _ in range(5):  # the camera appends; trailing bytes keep the file complete
        with open(path, "ab") as fh:
            fh.write(b"\0" * 2880)
        os.utime(path, (time.time() + _, time.time() + _))
        assert engine.intake.register(path, queued=()) is None
    assert len(engine.store.state_history(fid)) == history  # no row per append
    time.sleep(engine.cfg.daemon.settle_s + 0.1)
    engine.intake.register(path, queued=())
    assert engine.store.frame(fid)["size"] == path.stat().st_size


def test_a_log_line_that_goes_takes_its_rows_out_and_they_return_with_it(tmp_path, night):
    raw = tmp_path / "raw"
    raw.mkdir()
    log = raw / "night.log"
    log.write_text("5,9,OJ287,60,08:54:48,+20:06:30\n")
    engine = _engine(tmp_path, roots=[raw], catalog_file=night / "catalog.ecsv")
    store = engine.store
    fid = _frame(store, str(raw / "xl126g_0005.fits"), 5)
    engine.classify(fid)
    assert store.frame(fid)["state"] == "queued"
    store.finish_frame(fid, measurements=[{"star_id": "OJ287", "flux_e": 1.0,
                                           "mjd_mid": 57693.5}],
                       zeropoint=None, solution=None, state="done")
    def rows() -> int:
        return store.conn.execute("SELECT count(*) FROM measurements WHERE frame_id = ?",
                                  [fid]).fetchone()[0]

    assert rows() == 1
    log.write_text("6,9,OJ287,60,08:54:48,+20:06:30\n")  # frame 5 no longer in the log
    os.utime(log, (time.time() + 5, time.time() + 5))
    engine.handle_path(log)
    assert store.frame(fid)["state"] == "waiting_log"
    assert rows() == 0  # out of the exports and the light curve
    log.write_text("5,9,OJ287,60,08:54:48,+20:06:30\n")
    os.utime(log, (time.time() + 10, time.time() + 10))
    engine.handle_path(log)
    assert store.frame(fid)["state"] == "queued"  # measured again: its rows come back


@pytest.mark.parametrize("order", [("g", "."), (".", "g")])
def test_logs_are_found_whatever_the_order_of_nested_watch_folders(tmp_path, order):
    night = tmp_path / "NIGHT"
    (night / "g").mkdir(parents=True)
    (night / "20161101.log").write_text("5,9,OJ287,60,08:54:48,+20:06:30\n")
    engine = _engine(tmp_path, roots=[(night / o).resolve() for o in order])
    fid = _frame(engine.store, str((night / "g" / "xl126g_0005.fits").resolve()), 5)
    other = _frame(engine.store, str((night / "g" / "xl126g_0050.fits").resolve()), 50)
    engine.classify(fid)
    engine.classify(other)
    assert engine.store.frame(fid)["state"] == "queued"
    assert engine.store.frame(other)["state"] == "waiting_log"
    summary = engine.waiting_for_log_summary()
    assert summary.startswith("1 frame(s) wait") and "xl126g_0050.fits" in summary


def test_an_event_looks_at_its_one_file_not_the_whole_folder(tmp_path, monkeypatch):
    from photd import logbook

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "night.log").write_text("1,4,bias,0,,\n")
    for k in range(3000):
        (raw / f"note_{k:05d}.txt").write_text("camera chatter\n")
    engine = _engine(tmp_path, roots=[raw])
    engine.rescan()
    looked: list[Path] = []
    real = logbook.is_log_file
    monkeypatch.setattr(logbook, "is_log_file",
                        lambda p, cfg=None: looked.append(p) or real(p, cfg))
    t0 = time.perf_counter()
    for k in range(3000):
        engine.handle_path(raw / f"note_{k:05d}.txt")
    assert len(looked) == 3000  # one look per event: O(files), not O(files^2)
    assert time.perf_counter() - t0 < 30


def test_disk_threshold_above_what_the_disk_can_hold_is_lowered(tmp_path):
    from photd.housekeeping import MAX_FREE_FRACTION, sane_disk_threshold
    from photd.logs import get_logger

    total_mb = shutil.disk_usage(tmp_path).total / 1e6
    got = sane_disk_threshold(tmp_path, 10 * total_mb, get_logger())
    assert got == pytest.approx(MAX_FREE_FRACTION * total_mb, rel=1e-3)
    assert sane_disk_threshold(tmp_path, 1.0, get_logger()) == 1.0
