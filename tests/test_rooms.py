"""The daemon's rooms, each on its own: a temporary store, no process pool.

The engine is built with ``pool=None``: whatever these tests run, they run in
this process, so a failure points at the room and not at a worker.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from photd import pipeline
from photd.astrometry import BadFit
from photd.calibration import CalibrationError
from photd.catalog import CatalogSource
from photd.config import Config, ObslogConfig, with_overrides
from photd.errors import FrameRejected, FrameStop, WaitForCatalog, WaitForLog
from photd.frame_queue import (
    CalibrationJob,
    FrameQueue,
    InFlight,
    MasterJob,
    Queued,
    ScienceJob,
)
from photd.headers import HeaderError
from photd.logbook import Logbook
from photd.logs import get_logger
from photd.masters import MasterRebuilds
from photd.pipeline import SCIENCE_STEPS, FrameResult, RelativeReference
from photd.scheduler import Engine
from photd.store import Store
from photd.workdir import master_path, output_path, pause_marker, store_path

NIGHT = "2016-11-01"
LOG_LINES = "1,4,bias,0,,\n5,9,OJ287,60,08:54:48,+20:06:30\n"


@pytest.fixture
def store(tmp_path):
    s = Store.open(store_path(tmp_path / "work"))
    yield s
    s.close()


def _engine(tmp_path: Path, store: Store, roots: list[Path] = (), catalog=None) -> Engine:
    cfg = with_overrides(Config(), paths={"work": str(tmp_path / "work")})
    return Engine(cfg, store, None, get_logger(), roots=list(roots), catalog=catalog)


def _frame(store: Store, path: str, number: int, *, band: str = "g", night: str = NIGHT,
           sha: str = "abc") -> int:
    fid, _ = store.upsert_frame(path, size=100, mtime=1.0, sha256=sha, band=band,
                                frame_number=number, night=night, closed_at=1.0)
    return fid


# --------------------------------------------------------------------------- frame queue


def test_calibration_frames_queue_ahead_of_science_frames(store):
    queue = FrameQueue(store)
    science = Queued(NIGHT, "g", "OJ287", "object")
    queue.put(1, science)
    queue.put(2, Queued(NIGHT, "g", "bias", "bias"))
    queue.put(3, science)
    queue.put(4, Queued(NIGHT, "g", "flat", "flat"))  # behind the earlier bias
    queue.put(2, Queued(NIGHT, "g", "bias", "bias"))  # already queued: stays where it is
    assert list(queue) == [2, 4, 1, 3]
    assert queue.calibration_keys() == {(NIGHT, "g", "bias"), (NIGHT, "g", "flat")}
    assert queue.science_curves() == {("OJ287", "g")}


def test_a_requeued_frame_goes_to_the_back_in_state_queued(store):
    queue = FrameQueue(store)
    a = _frame(store, "/raw/a_0001.fits", 1)
    b = _frame(store, "/raw/a_0002.fits", 2)
    queue.put(a, Queued(NIGHT, "g", "OJ287", "object"))
    store.set_state(b, "done")
    queue.requeue(b)
    assert list(queue) == [a, b]
    assert store.frame(b)["state"] == "queued"


def test_jobs_in_flight_read_by_name():
    inflight = InFlight()
    inflight.add(cf.Future(), ScienceJob(1, NIGHT, "g", "OJ287", "uncalibrated", "s1"))
    inflight.add(cf.Future(), CalibrationJob(2, NIGHT, "r", "bias", "s2"))
    inflight.add(cf.Future(), MasterJob(NIGHT, "i", "flat", 3, {}))
    assert inflight.science_series() == {(NIGHT, "g", "OJ287")}
    assert inflight.science_curves() == {("OJ287", "g")}
    assert inflight.calibration_bands() == {(NIGHT, "r"), (NIGHT, "i")}
    assert inflight.master_keys() == {(NIGHT, "r", "bias"), (NIGHT, "i", "flat")}


def test_a_result_for_bytes_replaced_while_a_worker_had_them_is_dropped(tmp_path, store):
    engine = _engine(tmp_path, store)
    fid = _frame(store, "/raw/bias_0001.fits", 1, sha="new bytes")
    store.set_state(fid, "processing")
    fut: cf.Future = cf.Future()
    fut.set_result(FrameResult(fid, "calibration", output="/work/x.fits"))
    engine.inflight.add(fut, CalibrationJob(fid, NIGHT, "g", "bias", "old bytes"))
    engine.collect(timeout_s=0)
    assert store.frame(fid)["state"] == "processing"  # intake has the new bytes to handle
    assert not engine.masters  # and no master rebuild for the old ones


# --------------------------------------------------------------------------- masters


def test_a_new_master_bias_requeues_frames_measured_with_the_provisional_one(tmp_path, store):
    engine = _engine(tmp_path, store)
    bias_frames = [_frame(store, f"/raw/b_{n:04d}.fits", n) for n in (1, 2)]
    for n, fid in enumerate(bias_frames, 1):
        store.set_state(fid, "calibration", output=f"/work/b_{n:04d}.fits")
    science = _frame(store, "/raw/s_0005.fits", 5)
    # measured before tonight's bias existed: an earlier night's masters, provisional
    store.set_state(science, "done", kind="object", target="OJ287",
                    calib_version="provisional: uncalibrated")
    job = MasterJob(NIGHT, "g", "bias", 1, {f"/work/b_{n:04d}.fits": fid
                                            for n, fid in enumerate(bias_frames, 1)})
    engine.master_done(job, {"path": str(master_path(engine.work, NIGHT, "g", "bias", 1)),
                             "inputs": list(job.id_by_output), "rejected": {},
                             "elapsed_s": 0.1})
    assert store.latest_calibration(NIGHT, "g", "bias")["version"] == 1
    assert list(engine.queue) == [science]
    assert store.frame(science)["state"] == "queued"


def test_frames_measured_with_the_current_masters_stay_done(tmp_path, store):
    engine = _engine(tmp_path, store)
    store.record_calibration(NIGHT, "g", "bias", path="/work/bias_v001.fits", inputs=[])
    science = _frame(store, "/raw/s_0005.fits", 5)
    current = "provisional: bias 2016-11-01 v1"  # no flat yet: still provisional
    store.set_state(science, "done", calib_version=current)
    engine._requeue_stale(NIGHT, "g")
    assert list(engine.queue) == []


def test_flats_wait_for_the_nights_master_bias(store):
    cfg = Config()
    rebuilds = MasterRebuilds()
    rebuilds.mark(NIGHT, "g", "flat")
    assert rebuilds.due(store, cfg, busy=set()) == []  # no bias tonight yet
    rebuilds.mark(NIGHT, "g", "bias")
    due = rebuilds.due(store, cfg, busy=set())
    assert [job.kind for job, _task in due] == ["bias"]  # the flat waits for it
    assert rebuilds.dirty == {(NIGHT, "g", "flat")}


def test_a_master_waits_while_its_calibration_frames_are_still_coming(store):
    rebuilds = MasterRebuilds()
    rebuilds.mark(NIGHT, "g", "bias")
    assert rebuilds.due(store, Config(), busy={(NIGHT, "g", "bias")}) == []
    assert rebuilds.dirty == {(NIGHT, "g", "bias")}


# --------------------------------------------------------------------------- logbook


def test_logbook_finds_the_log_in_a_parent_folder(tmp_path):
    raw = tmp_path / "raw"
    (raw / "g").mkdir(parents=True)
    (raw / "night.log").write_text(LOG_LINES)
    book = Logbook(ObslogConfig(), [raw], get_logger())
    entry, why = book.entry_for({"path": str(raw / "g" / "xl126g_0006.fits"),
                                 "frame_number": 6})
    assert why == ""
    assert (entry.name, entry.kind) == ("OJ287", "object")
    assert book.take_changes() and not book.take_changes()  # read once, reported once


def test_logbook_says_which_logs_do_not_cover_a_frame(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "night.log").write_text(LOG_LINES)
    book = Logbook(ObslogConfig(), [raw], get_logger())
    entry, why = book.entry_for({"path": str(raw / "xl126g_0012.fits"), "frame_number": 12})
    assert entry is None
    assert why == "frame 12 is not covered by night.log"


def test_logbook_rereads_a_log_that_grew(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    log = raw / "night.log"
    log.write_text("1,4,bias,0,,\n")
    book = Logbook(ObslogConfig(), [raw], get_logger())
    frame = {"path": str(raw / "xl126g_0006.fits"), "frame_number": 6}
    assert book.entry_for(frame)[0] is None
    book.take_changes()
    log.write_text(LOG_LINES)
    os.utime(log, (2e9, 2e9))  # a new modification time, whatever the clock's resolution
    assert book.entry_for(frame)[0].name == "OJ287"
    assert book.take_changes()


# --------------------------------------------------------------------------- work folder


def test_the_work_folders_layout_is_one_place(tmp_path):
    work = tmp_path / "work"
    frame = {"path": "/raw/g/xl126g_0006.fits", "night": NIGHT, "band": "g"}
    assert output_path(work, frame) == work / "frames" / NIGHT / "g" / "xl126g_0006.fits"
    assert master_path(work, NIGHT, "r", "flat", 3) == \
        work / "masters" / NIGHT / "r" / "flat_v003.fits"
    assert store_path(work).name == "photd.sqlite"
    assert pause_marker(work).parent == work


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("exc, state", [
    (BadFit("too_few_matches", "3 matches (need 6)"), "badfit"),
    (HeaderError("truncated", "xl126g_0001.fits: file ended early"), "failed"),
    (CalibrationError("no_frames", "nothing to combine"), "failed"),
    (FrameRejected("not_an_image", "NAXIS=0"), "failed"),
    (WaitForLog("no_coordinates", "log line 3 gives none"), "waiting_log"),
    (WaitForCatalog("catalog_unavailable", "no reference stars"), "waiting_catalog"),
])
def test_every_frame_ending_error_gives_its_state_and_keeps_its_reason(exc, state):
    result = FrameResult(1, "done")
    pipeline._record_exception(result, exc)
    assert isinstance(exc, FrameStop)
    assert (result.state, result.reason) == (state, exc.reason)
    back = pickle.loads(pickle.dumps(exc))  # as it would come back from a worker
    assert (back.state, back.reason, str(back)) == (exc.state, exc.reason, str(exc))


def test_a_header_errors_reason_reaches_the_frames_state(tmp_path, store):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "night.log").write_text(LOG_LINES)
    path = raw / "xl126g_0006.fits"
    fits.PrimaryHDU(np.zeros((40, 30), np.int16)).writeto(path)  # no DATE-OBS
    engine = _engine(tmp_path, store, roots=[raw])
    fid = _frame(store, str(path), 6)
    engine.classify(fid)
    frame = store.frame(fid)
    entry, _ = engine.logbook.entry_for(frame)
    task = engine.science_task(frame, entry, str(output_path(engine.work, frame)),
                               (entry.ra_deg, entry.dec_deg), None)
    result = pipeline.process_science(task)
    engine.science_done(ScienceJob(fid, NIGHT, "g", "OJ287", task.masters.version, "abc"),
                        result)
    frame = store.frame(fid)
    assert (frame["state"], frame["reason"]) == ("failed", "no_obs_time")
    assert list(result.timings) == list(SCIENCE_STEPS[:2])  # read, then headers stopped it


# --------------------------------------------------------------------------- pipeline


def test_science_steps_run_in_the_declared_order(small_night, tmp_path, store):
    """A simulated night's first science frames, step by step in this process."""
    raw = small_night / "raw"
    cfg = with_overrides(Config(), paths={"work": str(tmp_path / "work")})
    catalog = CatalogSource(cfg.catalog, cfg.work_dir,
                            local_file=str(small_night / "catalog.ecsv"))
    engine = _engine(tmp_path, store, roots=[raw], catalog=catalog)
    results = []
    for path in sorted((raw / "g").glob("*.fits")):
        fid = engine.intake.register(path, queued=engine.queue)
        engine.classify(fid)
        frame = store.frame(fid)
        entry, _ = engine.logbook.entry_for(frame)
        if entry is None or entry.is_calibration:
            continue
        _ok, radec = engine.lookups.pointing(entry)
        _ok, stars = engine.lookups.stars_for(radec)
        task = engine.science_task(frame, entry, str(output_path(engine.work, frame)), radec,
                                   stars)
        results.append(pipeline.process_science(task))
        if results[-1].state == "done" or len(results) == 4:
            break
    for r in results:
        assert tuple(r.timings) == SCIENCE_STEPS[:len(r.timings)], (r.reason, r.message)
    assert results[-1].state == "done", (results[-1].reason, results[-1].message)
    assert tuple(results[-1].timings) == SCIENCE_STEPS
    without_stars = pipeline.process_science(
        pipeline.FrameTask(**{**task.__dict__, "stars": None}))
    assert (without_stars.state, without_stars.reason) == ("waiting_catalog",
                                                           "catalog_unavailable")
    assert tuple(without_stars.timings) == SCIENCE_STEPS[:3]


def test_a_step_out_of_order_stops_the_frame():
    timings: dict[str, float] = {}
    step = pipeline._Steps(timings, SCIENCE_STEPS)
    with step("read"):
        pass
    with pytest.raises(RuntimeError, match="'calibrate' out of order: expected 'headers'"):
        with step("calibrate"):
            pass


def test_relative_reference_keeps_its_stored_json_form():
    stored = {"frame_id": 7, "frame_number": 12, "wcs": {"CTYPE1": "RA---TAN"},
              "sources": {"x": [1.0], "y": [2.0], "flux": [3.0]},
              "stars": {"id": ["s1"], "ra": [133.7], "dec": [20.1]},
              "target_radec": [133.70, 20.10], "target_sep_arcsec": 0.4,
              "runner_up_arcsec": float("nan"), "id": "0123456789ab"}
    ref = RelativeReference.from_json(json.loads(json.dumps(stored)))
    assert json.dumps(ref.to_json()) == json.dumps(stored)
    assert (ref.frame_number, ref.n_sources, ref.target_radec) == (12, 1, (133.70, 20.10))
