"""Hostile inputs and faults: every bad input gets a state and a reason, nothing else suffers.

One daemon runs over one simulated night into which the whole hostile corpus
is mixed (a daemon per case would cost minutes). The corpus is generated here
from the simulated frames, so it needs no binary files in the repository.
The run has two phases over the same folders:

1. the work disk reports 50 MB free of 1 TB (``shutil.disk_usage`` replaced in
   the daemon process: a threshold above the disk's size is now lowered at
   start, so it cannot fake a full disk): intake must pause with a loud
   ``disk_full`` line and take in nothing;
2. the default limit: everything flows. Meanwhile the test holds a long read
   transaction on the store (WAL must keep the writer going), replaces one
   frame while a worker processes it and deletes another one.

Each row of :data:`CASES` then checks its own file in ``photd status --json``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from daemon_config import write_config
from photd.config import Config
from photd.obslog import parse_log
from photd.simulate import SimOptions, load_truth, simulate_night
from photd.watcher import BLOCK, check_complete

OPTS = SimOptions(seed=6, small=True, science_per_target=2, n_bias=3, n_flat=3, n_dark=0)
OJ287 = "08:54:48.87,+20:06:30.6"  # as the simulated log writes it
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NIGHT_ISO = "2016-11-01T17:30:00.000"

# Cuts of a 685440-byte frame (238 blocks): inside the header, exactly at the
# end of the header, at block boundaries inside the data, mid-block, and one
# byte short. Every boundary is checked without the daemon in
# test_check_complete_at_every_block_boundary_and_mid_block.
CUTS = {"mid_header": 1000, "header_only": BLOCK, "two_blocks": 2 * BLOCK,
        "block_100": 100 * BLOCK, "mid_block": 100 * BLOCK + 1234, "last_block": -BLOCK,
        "one_byte_short": -1}


@dataclass(frozen=True)
class Case:
    """One hostile file: where it lies (relative to raw/), what it must end as."""

    name: str
    path: str
    state: str | tuple[str, ...]
    reason: str | None  # prefix of the reason; None = no reason expected
    xfail: str = ""  # a known bug awaiting a patch in scheduler.py or pipeline.py


CASES = [
    Case("zero-byte file", "g/xl126g_0101.fits", "failed", "empty"),
    Case("text file named .fits", "g/xl126g_0102.fits", "failed", "not_fits"),
    Case("JPEG named .fits", "g/xl126g_0103.fits", "failed", "not_fits"),
    Case("header claiming NAXIS = 10**9", "g/xl126g_0104.fits", "failed", "not_fits"),
    *[Case(f"truncated {k}", f"g/xl126g_{111 + n:04d}.fits", "failed", "truncated")
      for n, k in enumerate(CUTS)],
    Case("non-ASCII header bytes", "g/xl126g_0120.fits", "done", None),
    Case("NAXIS=0", "g/xl126g_0121.fits", "failed", "not_an_image"),
    Case("3-D cube", "g/xl126g_0122.fits", "failed", "not_an_image"),
    Case("wrong frame size (science)", "g/xl126g_0123.fits", "failed", "wrong_shape"),
    Case("wrong frame size (bias)", "g/xl126g_0124.fits", "rejected", "wrong_shape"),
    Case("no log covers it", "g/xl126g_0150.fits", "waiting_log", "frame 150 is not covered"),
    Case("duplicate frame number", "g/xl126g_0008_copy.fits", "failed", "duplicate_frame"),
    Case("duplicate name in a sub-folder", "g/zcopy/xl126g_0009.fits", "failed",
         "duplicate_frame"),
    Case("symlink out of the watched folder", "g/xl126g_0160.fits", "failed", "outside_watch"),
    Case("target named ../../../escape", "g/xl126g_0180.fits", "done", None),
    Case("target named with SQL", "g/xl126g_0181.fits", "done", None),
    Case("target named with quotes", "g/xl126g_0182.fits", "done", None),
    Case("target name with a control character", "g/xl126g_0183.fits", "waiting_log",
         "frame 183 is not covered"),
    Case("GBK target name", "g/xl126g_0184.fits", "done", None),
    Case("permission denied", "g/xl126g_0170.fits", "failed", "unreadable"),
]

# Malformed lines of the three logs: (log, line number) -> reason code.
ROOT_LOG = "20161101.log"
LOG_PROBLEMS = {
    (ROOT_LOG, 6): "reversed_range", (ROOT_LOG, 7): "overlap", (ROOT_LOG, 8): "not_a_number",
    (ROOT_LOG, 9): "missing", (ROOT_LOG, 10): "out_of_range", (ROOT_LOG, 11): "out_of_range",
    (ROOT_LOG, 12): "not_a_number", (ROOT_LOG, 13): "field_count", (ROOT_LOG, 14): "missing",
    (ROOT_LOG, 15): "bad_name", (ROOT_LOG, 16): "out_of_range",
    (ROOT_LOG, 17): "bad_coordinate", (ROOT_LOG, 18): "encoding",
    ("g.log", 13): "bad_name", ("g.log", 15): "reversed_range", ("g.log", 16): "not_a_number",
    ("g.log", 17): "missing",
    ("r.log", 3): "bad_coordinate", ("r.log", 4): "field_count", ("r.log", 5): "encoding",
}


# --------------------------------------------------------------------------- corpus


def _set_card(blob: bytes, key: str, value: object) -> bytes:
    """Replace one header card in place (same 80 bytes), keeping the data bytes."""
    pad = key.ljust(8).encode()
    for at in range(0, blob.index(b"END" + b" " * 77) + 80, 80):
        if blob[at:at + 8] == pad:
            card = fits.Card(key, value).image.encode("ascii")
            return blob[:at] + card + blob[at + 80:]
    raise KeyError(key)


def _synthetic(number: int, data: np.ndarray | None, **cards: object) -> bytes:
    hdu = fits.PrimaryHDU(data)
    hdu.header["DATE-OBS"] = NIGHT_ISO
    hdu.header["FRAMENUM"] = number
    hdu.header["EXPTIME"] = 300.0
    for k, v in cards.items():
        hdu.header[k] = v
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue()


def _write_logs(raw: Path) -> None:
    root = raw / ROOT_LOG
    text = root.read_bytes().decode("utf-8").rstrip("\r\n").split("\r\n")
    assert len(text) == 5, text  # comment + 4 lines: the bad lines below start at 6
    bad = [
        "12,11,reversed,300,,",
        f"10,12,OJ287,300,{OJ287}",  # overlaps 10-11
        "abc,13,foo,300,,",
        "14,14,foo,300,08:54:48",
        "15,15,foo,300,25:00:00,+20:00:00",
        "16,16,foo,300,08:54:48,+95:00:00",
        "17,17,foo,abc,,",
        "18,18,foo,300,08:54:48,+20:06:30,extra",
        "19,19,,300,,",
        "20,20,foo\x01bar,300,,",
        "21,21,foo,-5,,",
        "22,22,foo,300,08:61:00,+20:00:00",
    ]
    lines = [s.encode("utf-8") for s in text + bad] + [b"23,23,\xff\xfe junk,300,,"]
    root.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")

    g = [
        "# hostile frames of band g, written by a GBK console",
        f"120,120,non-ascii header,300,{OJ287}",
        f"121,121,naxis zero,300,{OJ287}",
        f"122,122,cube,300,{OJ287}",
        f"123,123,small frame,300,{OJ287}",
        "124,124,bias,0,,",
        f"160,160,symlinked,300,{OJ287}",
        f"170,170,locked,300,{OJ287}",
        f"180,180,../../../escape,300,{OJ287}",
        f"181,181,x'); DROP TABLE frames;--,300,{OJ287}",
        f"182,182,\"quoted\" 'name' `tick` $(id),300,{OJ287}",
        "",
        f"183,183,bell\x07name,300,{OJ287}",
        f"184,184,猎户座,300,{OJ287}",
        "190,189,坏的范围,300,,",
        "191,191,星,abc,,",
        "192,192,星二,300,08:54:48",
    ]
    (raw / "g" / "g.log").write_bytes("\r\n".join(g).encode("gbk") + b"\r\n")
    r = ["# band r extras (UTF-8, LF, no BOM)", f"300,301,Vénus,300,{OJ287}",
         "302,302,bad ra,300,08:99:00,+20:00:00", "303,303,too,many,fields,here,x,y"]
    (raw / "r" / "r.log").write_bytes("\n".join(r).encode() + b"\n304,304,\xff\xfe,300,,\n")


def build_corpus(night: Path, outside: Path) -> None:
    """Mix every hostile case of :data:`CASES` into a simulated night."""
    raw = night / "raw"
    g = raw / "g"
    base = (g / "xl126g_0010.fits").read_bytes()  # an OJ287 frame
    (g / "xl126g_0101.fits").write_bytes(b"")
    (g / "xl126g_0102.fits").write_text("SIMPLE? no: a text file with a FITS name\n" * 20)
    (g / "xl126g_0103.fits").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01"
                                          + bytes(range(256)) * 40 + b"\xff\xd9")
    cards = [fits.Card("SIMPLE", True), fits.Card("BITPIX", 16), fits.Card("NAXIS", 10**9)]
    huge = "".join(c.image for c in cards) + "END".ljust(80)
    (g / "xl126g_0104.fits").write_bytes(huge.ljust(BLOCK).encode("ascii"))
    for n, cut in enumerate(CUTS.values()):
        (g / f"xl126g_{111 + n:04d}.fits").write_bytes(base[:cut])
    nonascii = bytearray(_set_card(base, "FRAMENUM", 120))
    at = nonascii.index(b"INSTRUME= ")
    nonascii[at + 11:at + 14] = "中".encode()  # a UTF-8 character inside a FITS string
    (g / "xl126g_0120.fits").write_bytes(bytes(nonascii))
    (g / "xl126g_0121.fits").write_bytes(_synthetic(121, None))
    (g / "xl126g_0122.fits").write_bytes(_synthetic(122, np.zeros((3, 60, 50), np.int16)))
    noise = np.random.default_rng(1).normal(1000, 10, (80, 100)).astype(np.int16)
    (g / "xl126g_0123.fits").write_bytes(_synthetic(123, noise))
    (g / "xl126g_0124.fits").write_bytes(_synthetic(124, noise, EXPTIME=0.0))
    (g / "xl126g_0150.fits").write_bytes(_set_card(base, "FRAMENUM", 150))
    (g / "xl126g_0008_copy.fits").write_bytes((g / "xl126g_0008.fits").read_bytes())
    (g / "zcopy").mkdir()  # sorts after the original: the original is seen first
    (g / "zcopy" / "xl126g_0009.fits").write_bytes((g / "xl126g_0009.fits").read_bytes())
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.fits").write_bytes(_set_card(base, "FRAMENUM", 160))
    (g / "xl126g_0160.fits").symlink_to(outside / "secret.fits")
    for n in (180, 181, 182, 183, 184):
        (g / f"xl126g_{n:04d}.fits").write_bytes(_set_card(base, "FRAMENUM", n))
    locked = g / "xl126g_0170.fits"
    locked.write_bytes(_set_card(base, "FRAMENUM", 170))
    locked.chmod(0)
    _write_logs(raw)


# --------------------------------------------------------------------------- the run


def _config(tmp: Path, night: Path, **daemon: object) -> Path:
    path = tmp / f"photd-{len(list(tmp.glob('photd-*.toml')))}.toml"
    return write_config(path, night, tmp / "work", **{"truncated_timeout_s": 3.0, **daemon})


# ``photd run`` on a work disk that says it has 50 MB free of 1 TB.
_NEARLY_FULL = ("import shutil, sys\n"
                "from photd.cli import main\n"
                "shutil.disk_usage = lambda p: shutil._ntuple_diskusage(10**12, "
                "10**12 - 50 * 10**6, 50 * 10**6)\n"
                "sys.exit(main(sys.argv[1:]))")


def _photd(cfg: Path, *args: str, log: Path, nearly_full: bool = False,
           **kw) -> subprocess.Popen:
    start = ["-c", _NEARLY_FULL] if nearly_full else ["-m", "photd.cli"]
    with open(log, "a") as fh:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, *start, "run", "--config",
                                 str(cfg), *args], stdout=subprocess.DEVNULL, stderr=fh,
                                **kw)


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(errors="replace").splitlines()
            if line.startswith("{")]


def _status(cfg: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "photd.cli", "status", "--json", "--config",
                          str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _status_text(cfg: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "photd.cli", "status", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _files(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


@dataclass
class Run:
    tmp: Path
    night: Path
    work: Path
    cfg: Path
    phase1_rc: int
    phase1_events: list[dict]
    phase1_frames: int
    phase1_status_text: str
    rc: int
    events: list[dict]
    status: dict
    by_path: dict[str, dict]
    held_saw: tuple[int, int]  # frames seen by the held snapshot before/after the writer moved
    writer_frames_while_held: int
    wal_bytes_while_held: int
    replaced: dict
    deleted: str
    files_before: set[str]
    files_after: set[str]
    status_text: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    tmp = tmp_path_factory.mktemp("hostile")
    night = tmp / "night"
    simulate_night(night, OPTS)
    build_corpus(night, tmp / "outside")
    work = tmp / "work"
    log = tmp / "daemon.log"

    # Phase 1: the work disk is nearly full (50 MB free, below the default 1024 MB).
    cfg1 = _config(tmp, night)
    p = _photd(cfg1, "--until-idle", "2", log=log, nearly_full=True)
    phase1_rc = p.wait(timeout=120)
    phase1_events = _events(log)
    db = work / "photd.sqlite"
    con = sqlite3.connect(db)
    phase1_frames = con.execute("SELECT count(*) FROM frames").fetchone()[0]
    con.close()
    phase1_status_text = _status_text(cfg1)
    log.write_text("")

    # Phase 2: room again. A reader holds a snapshot from the start.
    cfg = _config(tmp, night)
    files_before = _files(tmp, work)
    uri = db.resolve().as_uri() + "?mode=ro"
    held = sqlite3.connect(uri, uri=True, isolation_level=None)
    held.execute("BEGIN")
    before = held.execute("SELECT count(*) FROM frames").fetchone()[0]
    poll = sqlite3.connect(uri, uri=True, isolation_level=None)
    p = _photd(cfg, "--until-idle", "5", log=log)
    raw = night / "raw"
    victim_r = raw / "r" / "xl126r_0010.fits"
    victim_i = raw / "i" / "xl126i_0011.fits"
    replaced: dict = {}
    deleted = ""
    held_saw = (before, -1)
    writer_frames = wal_bytes = 0
    deadline = time.monotonic() + 240
    try:
        while p.poll() is None and time.monotonic() < deadline:
            states = dict(poll.execute("SELECT path, state FROM frames").fetchall())
            if held is not None and sum(s in ("done", "calibration", "failed")
                                        for s in states.values()) >= 15:
                held_saw = (before, held.execute("SELECT count(*) FROM frames").fetchone()[0])
                writer_frames = len(states)
                wal = db.with_name(db.name + "-wal")
                wal_bytes = wal.stat().st_size if wal.exists() else 0
                held.execute("COMMIT")
                held.close()
                held = None
            if not replaced and states.get(str(victim_r)) == "processing":
                # The camera rewrites the frame (a corrected DATE-OBS) while a worker has it.
                blob = _set_card(victim_r.read_bytes(), "DATE-OBS", "2016-11-01T17:41:00.000")
                tmp_name = victim_r.with_name("." + victim_r.name + ".tmp")
                tmp_name.write_bytes(blob)
                os.replace(tmp_name, victim_r)
                replaced = {"date_obs": "2016-11-01T17:41:00.000", "at": time.time()}
            if not deleted and states.get(str(victim_i)) == "processing":
                victim_i.unlink()
                deleted = str(victim_i)
            time.sleep(0.02)
    finally:
        if p.poll() is None:
            p.kill()
        rc = p.wait(timeout=60)
        poll.close()
        if held is not None:
            held.close()
    status = _status(cfg)
    return Run(tmp, night, work, cfg, phase1_rc, phase1_events, phase1_frames,
               phase1_status_text, rc, _events(log), status,
               {f["path"]: f for f in status["frames"]}, held_saw, writer_frames, wal_bytes,
               replaced, deleted, files_before, _files(tmp, work), _status_text(cfg))


# --------------------------------------------------------------------------- inputs


def _case_param(case: Case):
    marks = []
    if case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail, strict=True))
    if case.name == "permission denied" and IS_ROOT:
        marks.append(pytest.mark.skip(reason="running as root: chmod 000 does not deny reads"))
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_case_param(c) for c in CASES])
def test_hostile_file_ends_in_its_state_with_its_reason(run: Run, case: Case):
    path = str(run.night / "raw" / case.path)
    assert run.rc == 0, "the daemon must survive the whole corpus"
    got = run.by_path.get(path)
    assert got is not None, f"{case.path} never reached the store"
    states = (case.state,) if isinstance(case.state, str) else case.state
    assert got["state"] in states, got
    if case.reason is None:
        assert got["reason"] is None, got
    else:
        assert got["reason"] and got["reason"].startswith(case.reason), got
    failures = [e for e in run.events if e.get("frame") == path and e.get("level") in
                ("warning", "error") and e.get("event") != "observing log problem"]
    if got["state"] == "failed":
        assert failures, f"no warning or error line names {path}"


def test_good_frames_of_the_same_night_are_not_affected(run: Run):
    truth = load_truth(run.night)
    for fr in truth.frames():
        path = str(run.night / "raw" / fr["path"])
        if path == run.deleted:
            continue
        want = {"bias": "calibration", "flat": "calibration", "focus": "waiting_log"}.get(
            fr["kind"], "badfit" if fr["defect"] else "done")
        got = run.by_path[path]
        assert got["state"] == want, got
        if want in ("done", "calibration"):
            assert got["output"] and Path(got["output"]).is_file()
    assert not [e for e in run.events if "Traceback" in json.dumps(e)
                and e.get("level") == "critical"]
    assert len(run.by_path) == len(run.status["frames"]), "a frame is listed twice"


def test_malformed_log_lines_are_each_reported_with_file_line_and_reason(run: Run):
    reported = [e["error"] for e in run.events if e.get("event") == "observing log problem"]
    for (name, line_no), reason in LOG_PROBLEMS.items():
        assert any(msg.startswith(f"{name} line {line_no},") for msg in reported), (
            name, line_no, reason)
    # the good lines of the same logs are used: frames 1-11 and 120-184 were classified
    assert run.by_path[str(run.night / "raw" / "g" / "xl126g_0184.fits")]["state"] == "done"


def test_log_problems_parse_to_the_expected_reason_codes(run: Run):
    raw = run.night / "raw"
    for name, path in ((ROOT_LOG, raw / ROOT_LOG), ("g.log", raw / "g" / "g.log"),
                       ("r.log", raw / "r" / "r.log")):
        parsed = parse_log(path.read_bytes(), name)
        got = {(name, p.line_no): p.reason_code for p in parsed.problems}
        want = {k: v for k, v in LOG_PROBLEMS.items() if k[0] == name}
        assert got == want


def test_log_problem_lines_carry_their_reason_code(run: Run):
    reasons = {e["reason"] for e in run.events if e.get("event") == "observing log problem"}
    assert set(LOG_PROBLEMS.values()) <= reasons


def test_hostile_target_names_write_nothing_outside_the_work_folder(run: Run):
    new = run.files_after - run.files_before
    assert not new, f"written outside the work folder: {sorted(new)}"
    work = run.work.resolve()
    for p in run.work.rglob("*"):
        assert p.resolve().is_relative_to(work), p
    for f in run.status["frames"]:
        if f["output"]:
            assert Path(f["output"]).resolve().is_relative_to(work), f
    con = sqlite3.connect(run.work / "photd.sqlite")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        targets = dict(con.execute("SELECT frame_number, target FROM frames "
                                   "WHERE frame_number BETWEEN 180 AND 184").fetchall())
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
    finally:
        con.close()
    assert {"frames", "measurements", "lightcurve"} <= tables
    assert targets[180] == "../../../escape"
    assert targets[181] == "x'); DROP TABLE frames;--"
    assert targets[182] == "\"quoted\" 'name' `tick` $(id)"
    assert targets[184] == "猎户座"


def test_hostile_target_name_plot_stays_in_the_current_folder(run: Run, tmp_path: Path):
    out = subprocess.run([sys.executable, "-m", "photd.cli", "plot", "../../../escape",
                          "--config", str(run.cfg)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    made = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert made and all(".." not in p.name for p in made), made
    assert run.files_after == _files(run.tmp, run.work)


def _replaced_victim(run: Run) -> dict:
    assert run.replaced, "the victim was never seen in state processing"
    path = str(run.night / "raw" / "r" / "xl126r_0010.fits")
    con = sqlite3.connect(run.work / "photd.sqlite")
    try:
        fid, state, sha = con.execute("SELECT id, state, sha256 FROM frames WHERE path = ?",
                                      [path]).fetchone()
        n_rows, n_stars = con.execute("SELECT count(*), count(DISTINCT star_id) FROM "
                                      "measurements WHERE frame_id = ?", [fid]).fetchone()
        mjd = [r[0] for r in con.execute("SELECT mjd FROM lightcurve WHERE frame_id = ?",
                                         [fid])]
        history = con.execute("SELECT state, reason FROM state_log WHERE frame_id = ? "
                              "ORDER BY id", [fid]).fetchall()
    finally:
        con.close()
    return {"path": path, "state": state, "sha": sha, "n_rows": n_rows, "n_stars": n_stars,
            "mjd": mjd, "history": history}


def test_frame_replaced_while_processed_keeps_one_set_of_rows(run: Run):
    from photd.watcher import sha256_of

    got = _replaced_victim(run)
    assert got["state"] == "done"
    assert got["sha"] == sha256_of(got["path"])
    assert got["n_rows"] == got["n_stars"] > 0
    assert len(got["mjd"]) == 1
    assert any(why and "content changed" in why for _, why in got["history"])


def test_frame_replaced_while_processed_is_measured_from_its_new_content(run: Run):
    from astropy.time import Time

    got = _replaced_victim(run)
    rows = got["history"]
    reset = next(i for i, (_, why) in enumerate(rows) if why and "content changed" in why)
    after = [s for s, _ in rows[reset + 1:]]
    # The first result after the reset must come from a new run of a worker ...
    first_result = next(i for i, s in enumerate(after) if s in ("done", "badfit", "failed"))
    assert "processing" in after[:first_result], rows
    # ... so the light curve holds the new DATE-OBS (mid-exposure: +150 s).
    mid = Time(run.replaced["date_obs"], scale="utc").mjd + 150 / 86400
    assert got["mjd"][0] == pytest.approx(mid, abs=1e-6), "measured from the old content"


def test_frame_deleted_while_processed_gets_a_state_and_the_night_goes_on(run: Run):
    assert run.deleted, "the victim was never seen in state processing"
    got = run.by_path[run.deleted]
    # Either the worker had read it (done) or the read failed: the file is gone
    # (failed: vanished; taken again if it comes back, see test_reliability).
    assert (got["state"], (got["reason"] or "").split(":")[0]) in (
        ("done", ""), ("failed", "vanished")), got
    assert run.rc == 0


def test_check_complete_at_every_block_boundary_and_mid_block(tmp_path: Path):
    hdu = fits.PrimaryHDU(np.zeros((60, 70), np.uint16))
    hdu.header["FRAMENUM"] = 1
    whole = tmp_path / "whole.fits"
    hdu.writeto(whole)
    blob = whole.read_bytes()
    part = tmp_path / "part.fits"
    for cut in sorted({*range(BLOCK, len(blob), BLOCK), *range(BLOCK // 2, len(blob), BLOCK),
                       1, 79, 80, len(blob) - 1}):
        part.write_bytes(blob[:cut])
        got = check_complete(part)
        assert not got.complete, cut
        assert got.reason == ("partial_header" if cut < BLOCK else "truncated"), cut
    part.write_bytes(blob)
    assert check_complete(part).complete


def test_check_complete_refuses_a_symlink_out_of_the_watched_folders(tmp_path: Path):
    watched, outside = tmp_path / "raw", tmp_path / "elsewhere"
    watched.mkdir()
    outside.mkdir()
    fits.PrimaryHDU(np.zeros((4, 4), np.int16)).writeto(outside / "x.fits")
    (watched / "a.fits").symlink_to(outside / "x.fits")
    (watched / "b.fits").symlink_to("../raw/c.fits")
    fits.PrimaryHDU(np.zeros((4, 4), np.int16)).writeto(watched / "c.fits")
    got = check_complete(watched / "a.fits", roots=[watched])
    assert (got.complete, got.reason) == (False, "outside_watch")
    assert check_complete(watched / "b.fits", roots=[watched]).complete
    assert check_complete(watched / "a.fits").complete  # no roots given: not checked


@pytest.mark.skipif(IS_ROOT, reason="running as root: chmod 000 does not deny reads")
def test_check_complete_on_a_file_it_may_not_read(tmp_path: Path):
    f = tmp_path / "locked.fits"
    fits.PrimaryHDU(np.zeros((4, 4), np.int16)).writeto(f)
    f.chmod(0)
    got = check_complete(f)
    assert (got.complete, got.reason) == (False, "unreadable")


# --------------------------------------------------------------------------- faults


def test_full_work_disk_pauses_intake_loudly_and_takes_in_nothing(run: Run):
    assert run.phase1_rc == 0
    loud = [e for e in run.phase1_events if e.get("reason") == "disk_full"]
    assert loud and loud[0]["level"] == "error" and "free_mb" in loud[0]
    assert run.phase1_frames == 0
    # an operator sees it in `photd status`, with the config key to look at
    assert run.phase1_status_text.startswith("INTAKE PAUSED")
    assert "daemon.min_free_disk_mb = 1024.0" in run.phase1_status_text
    # then, with room again, the same folder flows (checked by the case tests)
    assert run.status["counts"].get("done", 0) >= 12
    assert "PAUSED" not in run.status_text


def test_long_reader_does_not_stop_the_writer_and_the_wal_is_checkpointed_after(run: Run):
    before, during = run.held_saw
    assert during == before == 0, "the held snapshot must not see later commits"
    assert run.writer_frames_while_held >= 15, "the writer must commit while a reader holds"
    assert run.wal_bytes_while_held > 0
    # The daemon closed the store: everything is in the main file, the WAL is empty.
    wal = run.work / "photd.sqlite-wal"
    assert not wal.exists() or wal.stat().st_size == 0
    con = sqlite3.connect(run.work / "photd.sqlite")
    try:
        busy, _log, _done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        con.close()
    assert busy == 0


def _full_disk_writes(monkeypatch: pytest.MonkeyPatch, after_bytes: int) -> None:
    """Every file opened by os.fdopen for writing fails with ENOSPC after some bytes."""
    real = os.fdopen

    class Filling:
        def __init__(self, fh):
            self.fh, self.written = fh, 0

        def write(self, data):
            if self.written + len(data) > after_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(data)
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def fdopen(fd, mode="r", *a, **kw):
        fh = real(fd, mode, *a, **kw)
        return Filling(fh) if "w" in mode else fh

    monkeypatch.setattr(os, "fdopen", fdopen)


def _calibration_task(raw: Path, out: Path):
    from photd.obslog import parse_line
    from photd.pipeline import FrameTask

    entry = parse_line("1,3,bias,0,,", 1, "night.log")
    return FrameTask(1, str(raw), str(out), "g", 1, "2016-11-01", entry, Config())


def test_disk_full_while_writing_leaves_nothing_half_written(tmp_path, monkeypatch):
    from photd.headers import write_processed

    raw = tmp_path / "raw.fits"
    _hdu = fits.PrimaryHDU(np.zeros((200, 100), np.int16))
    _hdu.header["DATE-OBS"] = NIGHT_ISO
    _hdu.writeto(raw)
    out = tmp_path / "work" / "out.fits"
    _full_disk_writes(monkeypatch, after_bytes=2 * BLOCK)
    with pytest.raises(OSError) as err:
        write_processed(raw, out, fits.getheader(raw))
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_disk_full_while_writing_leaves_the_frame_to_be_retried(tmp_path, monkeypatch):
    from photd import pipeline

    raw = tmp_path / "xl126g_0001.fits"
    hdu = fits.PrimaryHDU(np.zeros((200, 100), np.int16))
    hdu.header["DATE-OBS"] = NIGHT_ISO
    hdu.writeto(raw)
    _full_disk_writes(monkeypatch, after_bytes=BLOCK)
    result = pipeline.process_calibration(_calibration_task(raw, tmp_path / "w" / raw.name))
    assert not list((tmp_path / "w").glob("*"))
    assert (result.state, result.reason) == ("arrived", "disk_full")
