"""The daemon as a user runs it: real processes, real files, real SQLite."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

from daemon_config import write_config
from night_rows import assert_same_night, store_rows
from photd.simulate import SimOptions, load_truth, simulate_night
from photd.watcher import check_complete

TINY = SimOptions(seed=5, small=True, science_per_target=4, n_bias=4, n_flat=4, n_dark=0)


def _config(tmp: Path, night: Path, **daemon: object) -> Path:
    return write_config(tmp / "photd.toml", night, tmp / "work", **daemon)


def _photd(*args: str, **kw) -> subprocess.Popen:
    """Start ``photd``; its log goes to a file (a full pipe would stall the daemon)."""
    cfg = Path(args[args.index("--config") + 1])
    log = open(cfg.parent / "daemon.log", "a")  # noqa: SIM115 - closed by the OS at exit
    return subprocess.Popen([sys.executable, "-m", "photd.cli", *args],
                            stdout=subprocess.DEVNULL, stderr=log, text=True, **kw)


def _wait(p: subprocess.Popen, timeout: float) -> str:
    """Wait for a daemon and return its log."""
    p.wait(timeout=timeout)
    cfg = Path(p.args[p.args.index("--config") + 1])
    return (cfg.parent / "daemon.log").read_text()


def _status(cfg: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "photd.cli", "status", "--json", "--config",
                          str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _expected_state(frame: dict) -> set[str]:
    if frame["kind"] in ("bias", "flat", "dark"):
        return {"calibration"}
    if frame["kind"] == "focus":
        return {"waiting_log"}
    if frame["defect"]:
        return {"badfit"}
    return {"done"}


def _check_final_states(status: dict, truth) -> None:
    by_path = {}
    for f in status["frames"]:
        assert f["path"] not in by_path, f"{f['path']} listed twice"
        by_path[f["path"]] = f
    root = truth.root / "raw"
    for fr in truth.frames():
        got = by_path[str(root / fr["path"])]
        assert got["state"] in _expected_state(fr), (fr["path"], got)
        if got["state"] in ("done", "calibration"):
            assert got["output"] and Path(got["output"]).exists()
    assert len(by_path) == len(truth.frames())


def test_check_complete_follows_a_frame_written_in_chunks(tmp_path):
    data = fits.PrimaryHDU(data=np.zeros((100, 80), "uint16"))
    whole = tmp_path / "whole.fits"
    data.writeto(whole)
    blob = whole.read_bytes()
    part = tmp_path / "part.fits"
    for cut, reason in ((0, "empty"), (1000, "partial_header"), (2880 + 100, "truncated"),
                        (len(blob) - 1, "truncated")):
        part.write_bytes(blob[:cut])
        got = check_complete(part)
        assert not got.complete and got.reason == reason
    part.write_bytes(blob)
    assert check_complete(part).complete
    text = tmp_path / "notes.fits"
    text.write_text("this is not a FITS file\n" * 10)
    assert check_complete(text).reason == "not_fits"


def test_night_written_live_ends_with_every_frame_in_its_state_once(tmp_path):
    night = tmp_path / "night"
    (night / "raw").mkdir(parents=True)
    cfg = _config(tmp_path, night)
    daemon = _photd("run", "--config", str(cfg), "--until-idle", "6")
    try:
        writer = threading.Thread(target=simulate_night, args=(night, TINY),
                                  kwargs={"arrival_s": 0.3})
        writer.start()
        # a reader polls the store all along, like an observer's `photd status`
        polls = 0
        while writer.is_alive():
            if (tmp_path / "work" / "photd.sqlite").exists():
                _status(cfg)
                polls += 1
            time.sleep(0.5)
        writer.join()
        err = _wait(daemon, 600)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err[-3000:]
    assert polls > 0
    truth = load_truth(night)
    _check_final_states(_status(cfg), truth)
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    done = [e for e in events if e.get("event") == "frame done"]
    assert done and all({"frame", "band", "stage", "elapsed_s"} <= set(e) for e in done)
    rows = store_rows(tmp_path / "work")
    n_done = sum(1 for s in rows["states"].values() if s == "done")
    assert n_done == sum(1 for f in truth.frames("object") if not f["defect"])
    assert len(rows["lightcurve"]) == n_done  # one target row per measured frame
    # end-of-night housekeeping: a summary with the night's counts, a plot per target
    summary = json.loads(next((tmp_path / "work" / "nights").glob("*/summary.json")).read_text())
    assert summary["counts"]["done"] == n_done
    for target in ("PKS0235+164", "OJ287"):
        assert Path(summary["targets"][target]["plot"]).stat().st_size > 10_000
    assert (tmp_path / "work" / "backup" / "photd.sqlite.bak").exists()
    # the export contract, through the command line an observer uses
    out = subprocess.run([sys.executable, "-m", "photd.cli", "export", "OJ287", "--band", "r",
                          "--format", "csv", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    lines = out.stdout.splitlines()
    assert lines[0] == ("target,band,frame,mjd,bjd_tdb,mag,mag_err,diff_mag,diff_mag_err,"
                        "airmass,fwhm_arcsec,aperture_px,flags")
    good = [f["number"] for f in truth.frames("object", "r")
            if f["target"] == "OJ287" and not f["defect"]]
    assert sorted(int(line.split(",")[2]) for line in lines[1:]) == good


def test_frames_that_arrive_before_the_log_wait_then_flow_when_it_appears(tmp_path):
    night = tmp_path / "night"
    opts = SimOptions(seed=6, small=True, science_per_target=2, n_bias=3, n_flat=3, n_dark=0)
    simulate_night(night, opts)
    log = next((night / "raw").glob("*.log"))
    text = log.read_bytes()
    log.unlink()
    cfg = _config(tmp_path, night)
    daemon = _photd("run", "--config", str(cfg))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(1.0)
            if not (tmp_path / "work" / "photd.sqlite").exists():
                continue
            st = _status(cfg)
            if st["counts"].get("waiting_log", 0) == len(load_truth(night).frames()):
                break
        assert st["counts"] == {"waiting_log": len(load_truth(night).frames())}
        assert all("no observing log" in f["reason"] for f in st["frames"])
        # the observer copies the log in at the end of the night
        log.write_bytes(text)
        deadline = time.time() + 300
        while time.time() < deadline:
            time.sleep(1.0)
            st = _status(cfg)
            if st["counts"].get("waiting_log", 0) <= 3 and not st["counts"].get("queued") \
                    and not st["counts"].get("processing"):
                break
    finally:
        daemon.send_signal(signal.SIGTERM)
        err = _wait(daemon, 120)
    assert daemon.returncode == 0, err[-2000:]
    _check_final_states(_status(cfg), load_truth(night))


def test_truncated_frame_fails_after_the_timeout_and_the_night_goes_on(tmp_path):
    night = tmp_path / "night"
    opts = SimOptions(seed=8, small=True, science_per_target=1, n_bias=2, n_flat=2, n_dark=0)
    simulate_night(night, opts)
    victim = night / "raw" / "g" / "xl126g_0001.fits"
    blob = victim.read_bytes()
    victim.write_bytes(blob[: len(blob) // 2])
    junk = night / "raw" / "r" / "xl126r_9999.fits"
    junk.write_text("a text file with a FITS name\n")
    cfg = _config(tmp_path, night, truncated_timeout_s=2.0)
    daemon = _photd("run", "--config", str(cfg), "--until-idle", "5")
    err = _wait(daemon, 300)
    assert daemon.returncode == 0, err[-2000:]
    frames = {f["path"]: f for f in _status(cfg)["frames"]}
    assert frames[str(victim)]["state"] == "failed"
    assert frames[str(victim)]["reason"] == "truncated"
    assert frames[str(junk)]["state"] == "failed" and frames[str(junk)]["reason"] == "not_fits"
    assert victim.read_bytes() == blob[: len(blob) // 2]  # raw frames are never touched
    assert frames[str(night / "raw" / "g" / "xl126g_0002.fits")]["state"] == "calibration"


def test_kill_9_at_random_moments_ends_like_an_undisturbed_run(tmp_path):
    night = tmp_path / "night"
    simulate_night(night, TINY)
    calm = tmp_path / "calm"
    calm.mkdir()
    cfg = _config(calm, night)
    p = _photd("run", "--config", str(cfg), "--until-idle", "4")
    err = _wait(p, 600)
    assert p.returncode == 0, err[-2000:]
    reference = store_rows(calm / "work")

    rough = tmp_path / "rough"
    rough.mkdir()
    cfg2 = _config(rough, night)
    rng = random.Random(42)
    for _ in range(20):
        p = _photd("run", "--config", str(cfg2), start_new_session=True)
        time.sleep(rng.uniform(1.0, 4.0))
        os.killpg(p.pid, signal.SIGKILL)  # the daemon and its workers, mid-whatever
        p.wait(timeout=60)
    p = _photd("run", "--config", str(cfg2), "--until-idle", "4")
    err = _wait(p, 600)
    assert p.returncode == 0, err[-2000:]
    assert_same_night(store_rows(rough / "work"), reference, lightcurve_values=True)


def test_dawn_flats_remeasure_provisional_frames_without_duplicates(tmp_path):
    night = tmp_path / "night"
    (night / "raw").mkdir(parents=True)
    opts = SimOptions(seed=9, small=True, science_per_target=3, n_bias=3, n_flat=4,
                      n_dark=0, flats="dawn")
    cfg = _config(tmp_path, night)
    daemon = _photd("run", "--config", str(cfg), "--until-idle", "6")
    try:
        # frames arrive live, the log grows with them: science frames are measured
        # long before the dawn flats exist
        simulate_night(night, SimOptions(**{**opts.__dict__, "log": "growing"}),
                       arrival_s=1.0)
        err = _wait(daemon, 600)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err[-3000:]
    truth = load_truth(night)
    _check_final_states(_status(cfg), truth)
    con = sqlite3.connect(tmp_path / "work" / "photd.sqlite")
    try:
        done = con.execute("SELECT id, calib_version FROM frames WHERE state='done'").fetchall()
        assert done
        first_flat = con.execute("SELECT MIN(created) FROM calibrations "
                                 "WHERE kind='flat'").fetchone()[0]
        provisional = 0
        for fid, version in done:
            # every measurement ends calibrated with the night's final flat and gain
            assert "flat 20" in version and "gain" in version, version
            dones = [ts for (ts,) in con.execute(
                "SELECT ts FROM state_log WHERE frame_id=? AND state='done' ORDER BY id",
                (fid,))]
            if dones[0] < first_flat:  # measured before any flat existed ...
                provisional += 1
                assert len(dones) >= 2, (fid, dones)  # ... so measured again once it did
            versions = {v for (v,) in con.execute(
                "SELECT DISTINCT calib_version FROM measurements WHERE frame_id=?", (fid,))}
            assert versions == {version}
        assert provisional >= 6
        n_lc = con.execute("SELECT COUNT(*) FROM lightcurve").fetchone()[0]
        assert n_lc == len(done)
        dup = con.execute("SELECT frame_id, star_id, COUNT(*) c FROM measurements "
                          "GROUP BY frame_id, star_id HAVING c > 1").fetchall()
        assert dup == []
    finally:
        con.close()


def test_night_without_calibrations_uses_the_previous_nights_masters_flagged(tmp_path):
    first = SimOptions(seed=12, small=True, science_per_target=1, n_bias=3, n_flat=3,
                       n_dark=0, night="2016-11-01")
    second = SimOptions(seed=12, small=True, science_per_target=2, n_bias=0, n_flat=0,
                        n_dark=0, night="2016-11-02")
    simulate_night(tmp_path / "n1", first)
    simulate_night(tmp_path / "n2", second)
    cfg = _config(tmp_path, tmp_path / "n1")
    text = cfg.read_text().replace(
        f"watch = [{str(tmp_path / 'n1' / 'raw')!r}]",
        f"watch = [{str(tmp_path / 'n1' / 'raw')!r}, {str(tmp_path / 'n2' / 'raw')!r}]")
    cfg.write_text(text)
    err = _wait(_photd("run", "--config", str(cfg), "--until-idle", "5"), 600)
    assert "Traceback" not in err, err[-2000:]
    con = sqlite3.connect(tmp_path / "work" / "photd.sqlite")
    try:
        rows = con.execute("SELECT night, state, calib_version, id FROM frames "
                           "WHERE kind='object'").fetchall()
        second_night = [r for r in rows if r[0] == "2016-11-02"]
        assert len(second_night) == 2 * 2 * 3
        for _night, state, version, fid in second_night:
            if state != "done":
                continue
            assert version.startswith("provisional: bias 2016-11-01"), version
            assert "flat 2016-11-01" in version
            flags = con.execute("SELECT flags FROM lightcurve WHERE frame_id=?",
                                (fid,)).fetchone()[0]
            assert flags & 1024  # the light-curve point says it is provisional
        assert sum(r[1] == "done" for r in second_night) >= 6
        first_night = [r for r in rows if r[0] == "2016-11-01" and r[1] == "done"]
        assert first_night and all(not r[2].startswith("provisional") for r in first_night)
    finally:
        con.close()
