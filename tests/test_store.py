"""Behaviour of the SQLite store: the daemon's journal.

Every test uses a real SQLite file in ``tmp_path``; the concurrency and crash
tests run the other side in a real separate process.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from photd import store as store_module
from photd.store import (
    STATES,
    TERMINAL_STATES,
    Store,
    StoreDamaged,
    StoreError,
    UnknownFrameError,
    backup_generations,
    restore_from_backup,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NIGHT = "2024-03-05"
EVIL = "'; DROP TABLE frames; --"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "work" / "photd.sqlite"


@pytest.fixture
def store(db_path: Path):
    with Store.open(db_path) as s:
        yield s


def add_frame(store: Store, number: int, *, band: str = "g", sha: str | None = None) -> int:
    frame_id, _ = store.upsert_frame(
        f"raw/{band}/xl126{band}_{number:04d}.fits",
        size=1000 + number,
        mtime=1.7e9 + number,
        sha256=sha or f"sha-{band}-{number}",
        band=band,
        frame_number=number,
        night=NIGHT,
        closed_at=1.7e9 + number,
    )
    return frame_id


def stars(n: int, value: float) -> list[dict]:
    return [{"star_id": f"gaia:{k}", "flux_e": value, "mag": value + k} for k in range(n)]


def run_python(code: str, *args: str) -> subprocess.Popen:
    """Start ``code`` in a separate Python process that imports this checkout."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "daemon")},
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


# ---- schema and migrations ---------------------------------------------------


def test_open_creates_parent_folder_schema_and_wal(db_path: Path) -> None:
    with Store.open(db_path) as s:
        assert s.schema_version() == len(store_module.MIGRATIONS)
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
        assert s.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
        tables = set(s.db.table_names())
    assert {
        "nights",
        "frames",
        "state_log",
        "calibrations",
        "detector_params",
        "solutions",
        "measurements",
        "zeropoints",
        "lightcurve",
    } <= tables


def test_reopening_runs_no_migration_twice(db_path: Path, monkeypatch) -> None:
    calls: list[int] = []

    def add_peak_column(db) -> None:
        calls.append(1)
        db.execute("ALTER TABLE measurements ADD COLUMN peak_adu REAL")

    Store.open(db_path).close()  # today's version on disk
    released = len(store_module.MIGRATIONS)
    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, add_peak_column])
    for _ in range(3):
        with Store.open(db_path) as s:
            assert s.schema_version() == released + 1
    assert calls == [1]


def test_column_added_by_migration_is_accepted_by_replace_measurements(
    db_path: Path, monkeypatch
) -> None:
    def add_peak_column(db) -> None:
        db.execute("ALTER TABLE measurements ADD COLUMN peak_adu REAL")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, add_peak_column])
    with Store.open(db_path) as s:
        fid = add_frame(s, 1)
        s.replace_measurements(fid, [{"star_id": "a", "peak_adu": 41000.0}])
        assert s.measurements_for(star_id="a")[0]["peak_adu"] == 41000.0


def test_store_from_newer_photd_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError, match="99"):
        Store.open(db_path)
    with pytest.raises(StoreError, match="99"):
        Store.open_readonly(db_path)


def test_a_file_that_is_not_a_database_is_refused_by_name(tmp_path: Path) -> None:
    bogus = tmp_path / "photd.sqlite"
    bogus.write_bytes(b"SIMPLE  =                    T" + b" " * 2000)
    for opener in (Store.open, Store.open_readonly):
        with pytest.raises(StoreError, match="photd.sqlite"):
            opener(bogus)


def test_open_readonly_never_creates_a_file(tmp_path: Path) -> None:
    missing = tmp_path / "nothing" / "photd.sqlite"
    with pytest.raises(FileNotFoundError):
        Store.open_readonly(missing)
    assert not missing.exists() and not missing.parent.exists()


def test_readonly_store_refuses_writes(db_path: Path) -> None:
    Store.open(db_path).close()
    with Store.open_readonly(db_path) as reader:
        with pytest.raises(StoreError, match="read-only"):
            reader.set_state(1, "done")
        with pytest.raises(sqlite3.OperationalError):
            reader.conn.execute("DELETE FROM frames")


def test_state_constants_are_consistent() -> None:
    assert TERMINAL_STATES <= set(STATES)
    for required in ("arrived", "waiting_log", "calibration", "done", "badfit", "failed"):
        assert required in STATES


# ---- frames ----------------------------------------------------------------


def test_upsert_same_hash_is_unchanged_and_keeps_state(store: Store) -> None:
    fid = add_frame(store, 7)
    store.finish_frame(fid, measurements=stars(3, 1.0), target="M67")
    again, changed = store.upsert_frame(
        "raw/g/xl126g_0007.fits",
        size=1007,
        mtime=1.7e9 + 99,  # touched, same content
        sha256="sha-g-7",
        band="g",
        frame_number=7,
        night=NIGHT,
        closed_at=1.7e9 + 7,
    )
    assert (again, changed) == (fid, False)
    row = store.frame(fid)
    assert row["state"] == "done" and row["mtime"] == 1.7e9 + 99
    assert len(store.measurements_for(target="M67")) == 3


def test_upsert_new_hash_resets_frame_and_drops_its_results(store: Store) -> None:
    fid = add_frame(store, 7)
    other = add_frame(store, 8)
    for f in (fid, other):
        store.finish_frame(
            f,
            measurements=stars(3, 1.0),
            lightcurve_rows=[{"mjd": 60000.0 + f, "diff_mag": 0.1}],
            zeropoint={"zp": 25.0},
            solution={"n_matches": 30, "header": {"CTYPE1": "RA---TAN"}},
            target="M67",
            output=f"work/g/{f}.fits",
        )
    again, changed = store.upsert_frame(
        "raw/g/xl126g_0007.fits",
        size=2000,
        mtime=1.8e9,
        sha256="rewritten",
        band="g",
        frame_number=7,
        night=NIGHT,
        closed_at=1.8e9,
    )
    assert (again, changed) == (fid, True)
    row = store.frame(fid)
    assert row["state"] == "arrived"
    assert row["output"] is None and row["target"] is None and row["sha256"] == "rewritten"
    assert [m["frame_id"] for m in store.measurements_for(target="M67")] == [other] * 3
    assert [r["frame_id"] for r in store.lightcurve("M67")] == [other]
    assert store.zeropoint(fid) is None and store.solution(fid) is None
    assert store.state_history(fid)[-1]["reason"].startswith("content changed")


def test_new_frame_is_arrived_and_night_recorded(store: Store) -> None:
    fid, changed = store.upsert_frame(
        "raw/r/0001.fits",
        size=1,
        mtime=1.0,
        sha256="x",
        band="r",
        frame_number=1,
        night=NIGHT,
        closed_at=2.0,
    )
    assert changed
    assert store.frame(fid)["state"] == "arrived"
    assert store.frame_by_path("raw/r/0001.fits")["id"] == fid
    assert [n["night"] for n in store.nights()] == [NIGHT]


def test_set_state_sets_fields_logs_and_rejects_unknowns(store: Store) -> None:
    fid = add_frame(store, 1)
    store.set_state(fid, "processing")
    store.set_state(fid, "processing")  # still the same attempt
    store.set_state(
        fid,
        "badfit",
        "too_few_matches: 3 < 6",
        kind="object",
        target="SN 2024abc",
        timings={"astrometry": 1.25},
    )
    row = store.frame(fid)
    assert row["state"] == "badfit" and row["reason"] == "too_few_matches: 3 < 6"
    assert row["kind"] == "object" and row["timings"] == {"astrometry": 1.25}
    assert row["attempts"] == 1
    assert [h["state"] for h in store.state_history(fid)] == [
        "arrived",
        "processing",
        "processing",
        "badfit",
    ]
    with pytest.raises(ValueError, match="colour"):
        store.set_state(fid, "done", colour="blue")
    with pytest.raises(ValueError, match="exploded"):
        store.set_state(fid, "exploded")
    with pytest.raises(UnknownFrameError):
        store.set_state(fid + 100, "done")
    assert store.frame(fid)["state"] == "badfit"


def test_unfinished_skips_terminal_states_and_counts_add_up(store: Store) -> None:
    ids = [add_frame(store, n) for n in range(1, 8)]
    for fid, state in zip(
        ids, ["done", "badfit", "failed", "calibration", "rejected"], strict=False
    ):
        store.set_state(fid, state)
    store.set_state(ids[5], "waiting_log")
    assert [f["id"] for f in store.unfinished()] == ids[5:]
    counts = store.counts()
    assert counts["arrived"] == 1 and counts["waiting_log"] == 1 and counts["done"] == 1
    assert sum(counts.values()) == 7
    assert [f["id"] for f in store.frames(states=["done", "badfit"])] == ids[:2]


# ---- results: replace, never duplicate ---------------------------------------


def test_finish_frame_twice_replaces_rows_without_duplicates(store: Store) -> None:
    fid = add_frame(store, 3)
    store.set_state(fid, "processing", target="M67")
    store.finish_frame(
        fid,
        measurements=stars(5, 1.0),
        lightcurve_rows=[{"mjd": 60000.5, "diff_mag": 0.10}],
        zeropoint={"zp": 24.0, "n_stars": 5},
    )
    store.finish_frame(
        fid,
        measurements=stars(4, 2.0),
        lightcurve_rows=[{"mjd": 60000.5, "diff_mag": 0.20}],
        zeropoint={"zp": 24.5, "n_stars": 4},
    )
    rows = store.measurements_for(target="M67")
    assert len(rows) == 4 and {r["flux_e"] for r in rows} == {2.0}
    assert {r["band"] for r in rows} == {"g"}  # defaulted from the frame
    assert [r["diff_mag"] for r in store.lightcurve("M67")] == [0.20]
    assert store.zeropoint(fid)["zp"] == 24.5
    assert store.frame(fid)["state"] == "done" and store.frame(fid)["done_at"] is not None


def test_crash_inside_finish_frame_keeps_old_rows_and_state(store: Store, monkeypatch) -> None:
    fid = add_frame(store, 3)
    store.finish_frame(fid, measurements=stars(5, 1.0), zeropoint={"zp": 24.0}, target="M67")
    store.set_state(fid, "processing")

    def explode(self, frame, rows):
        # Called after finish_frame has deleted the old rows.
        assert self.conn.execute("SELECT count(*) FROM measurements").fetchone()[0] == 0
        raise RuntimeError("worker result was garbage")

    monkeypatch.setattr(Store, "_insert_measurements", explode)
    with pytest.raises(RuntimeError, match="garbage"):
        store.finish_frame(fid, measurements=stars(2, 9.0), zeropoint={"zp": 1.0})
    assert len(store.measurements_for(target="M67")) == 5
    assert store.zeropoint(fid)["zp"] == 24.0
    assert store.frame(fid)["state"] == "processing"
    assert not store.conn.in_transaction


def test_unknown_measurement_columns_are_named_and_nothing_written(store: Store) -> None:
    fid = add_frame(store, 3)
    store.replace_measurements(fid, stars(2, 1.0))
    with pytest.raises(ValueError, match="'colour'.*'snr'"):
        store.replace_measurements(fid, [{"star_id": "a", "snr": 5.0, "colour": 0.3}])
    assert len(store.measurements_for()) == 2


def test_numpy_values_are_stored_as_plain_numbers(store: Store) -> None:
    np = pytest.importorskip("numpy")
    fid = add_frame(store, 3)
    store.replace_measurements(
        fid, [{"star_id": "a", "flux_e": np.float32(1.5), "flags": np.int64(4), "mag": np.nan}]
    )
    (row,) = store.measurements_for()
    assert row["flux_e"] == 1.5 and row["flags"] == 4 and row["mag"] is None


def test_nested_transaction_failure_undoes_only_the_inner_block(store: Store) -> None:
    a, b = add_frame(store, 1), add_frame(store, 2)
    with store.transaction():
        store.set_state(a, "done")
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.set_state(b, "failed", "truncated")
                raise RuntimeError("inner")
    assert store.frame(a)["state"] == "done"
    assert store.frame(b)["state"] == "arrived"


def test_injection_looking_and_non_ascii_names_round_trip(store: Store) -> None:
    names = [EVIL, "NGC 2682 疏散星团", 'x" OR 1=1 --', "Robert'); DROP TABLE measurements;--"]
    for n, name in enumerate(names, start=1):
        fid = add_frame(store, n)
        store.finish_frame(
            fid,
            measurements=[{"star_id": name, "mag": 12.0}],
            lightcurve_rows=[{"mjd": 60000.0 + n, "diff_mag": 0.0}],
            target=name,
            log_source=f"logs/{name}.log",
        )
        assert store.frame(fid)["target"] == name
        assert [r["target"] for r in store.lightcurve(name)] == [name]
        assert [r["star_id"] for r in store.measurements_for(star_id=name)] == [name]
    assert set(store.db.table_names()) >= {"frames", "measurements"}
    assert store.counts() == {"done": len(names)}
    store.replace_lightcurve(EVIL, "g", [{"frame_id": 1, "diff_mag": 0.5}], ensemble_version=2)
    assert [r["diff_mag"] for r in store.lightcurve(EVIL, "g")] == [0.5]


def test_replace_lightcurve_rederives_whole_curve(store: Store) -> None:
    ids = [add_frame(store, n) for n in (1, 2, 3)]
    store.replace_lightcurve(
        "M67",
        "g",
        [
            {"frame_id": fid, "mjd": 60000.0 + 3 - k, "diff_mag": 0.1, "comparison": ["a"]}
            for k, fid in enumerate(ids)
        ],
        ensemble_version=1,
    )
    store.replace_lightcurve(
        "M67",
        "g",
        [{"frame_id": ids[0], "mjd": 60003.0, "diff_mag": 0.3, "comparison": ["a", "b"]}],
        ensemble_version=2,
    )
    (row,) = store.lightcurve("M67", band="g")
    assert row["ensemble_version"] == 2 and row["comparison"] == ["a", "b"]
    assert row["frame_number"] == 1
    with pytest.raises(ValueError, match="band"):
        store.replace_lightcurve("M67", "g", [{"frame_id": 1, "band": "r"}], ensemble_version=3)


def test_a_stale_light_curve_mark_survives_a_crash_and_clears_with_the_new_curve(
    db_path: Path,
) -> None:
    # The daemon marks a curve stale in the transaction that stores new
    # measurements and derives it later; a restart finds the marks.
    with Store.open(db_path) as s:
        fid = add_frame(s, 1)
        with s.transaction():
            s.mark_lightcurve_stale("OJ287", "r")
            s.mark_lightcurve_stale("OJ287", "r")  # twice: still one mark
        s.mark_lightcurve_stale("OJ287", "g")
        with pytest.raises(RuntimeError), s.transaction():
            s.mark_lightcurve_stale("PKS0235+164", "i")
            raise RuntimeError("killed before commit")
    with Store.open(db_path) as s:  # "after the crash"
        assert sorted(s.stale_lightcurves()) == [("OJ287", "g"), ("OJ287", "r")]
        s.replace_lightcurve("OJ287", "r", [{"frame_id": fid, "diff_mag": 0.1}], 1)
        assert s.stale_lightcurves() == [("OJ287", "g")]


# ---- calibrations and detector parameters -----------------------------------


def test_calibration_versions_and_fallback_to_earlier_night(store: Store) -> None:
    assert store.record_calibration("2024-03-01", "g", "flat", path="m1", inputs=["a"]) == 1
    assert store.record_calibration("2024-03-01", "g", "flat", path="m2", inputs=["a", "b"]) == 2
    assert store.record_calibration("2024-03-02", "g", "flat", path="f1", inputs=["c"]) == 1
    assert (
        store.record_calibration("2024-03-02", "g", "flat", path="f2", inputs=["c"], final=True)
        == 2
    )
    assert store.record_calibration("2024-03-02", "g", "flat", path="f3", inputs=["d"]) == 3
    latest = store.latest_calibration("2024-03-02", "g", "flat")
    assert latest["version"] == 3 and latest["inputs"] == ["d"]
    fallback = store.calibration_before(NIGHT, "g", "flat", max_age_days=7)
    assert (fallback["night"], fallback["path"]) == ("2024-03-02", "f2")  # final preferred
    assert store.calibration_before(NIGHT, "g", "flat", max_age_days=2) is None
    assert store.calibration_before("2024-03-02", "g", "flat", max_age_days=7)["path"] == "m2"
    assert store.calibration_before(NIGHT, "r", "flat", max_age_days=7) is None


def test_detector_params_replace_per_night_and_band(store: Store) -> None:
    store.set_detector_params(NIGHT, "g", gain_e_per_adu=1.9, rdnoise_e=6.0)
    store.set_detector_params(NIGHT, "g", gain_e_per_adu=2.0, rdnoise_e=5.5, inputs=["b1"])
    params = store.detector_params(NIGHT, "g")
    assert (params["gain_e_per_adu"], params["rdnoise_e"], params["inputs"]) == (2.0, 5.5, ["b1"])
    assert store.detector_params(NIGHT, "r") is None


# ---- status contract ---------------------------------------------------------


def test_status_json_has_exactly_the_contract_shape(store: Store) -> None:
    r2 = add_frame(store, 2, band="r")
    g10 = add_frame(store, 10)
    g9 = add_frame(store, 9)
    store.finish_frame(g9, measurements=[], output="work/g/0009.fits")
    store.set_state(r2, "failed", "truncated: 1000 of 2880 bytes")
    status = json.loads(json.dumps(store.status_json()))
    assert set(status) == {"counts", "frames"}
    assert status["counts"] == {"arrived": 1, "done": 1, "failed": 1}
    assert status["frames"] == [
        {
            "path": "raw/g/xl126g_0009.fits",
            "band": "g",
            "state": "done",
            "reason": None,
            "output": "work/g/0009.fits",
        },
        {
            "path": "raw/g/xl126g_0010.fits",
            "band": "g",
            "state": "arrived",
            "reason": None,
            "output": None,
        },
        {
            "path": "raw/r/xl126r_0002.fits",
            "band": "r",
            "state": "failed",
            "reason": "truncated: 1000 of 2880 bytes",
            "output": None,
        },
    ]
    assert store.frame(g10)["state"] == "arrived"


# ---- views for readers (sqlite3, pandas, Datasette) ------------------------------


def test_lightcurve_view_gives_frame_number_iso_ut_and_zero_point(store: Store) -> None:
    fid = add_frame(store, 17, band="r")
    store.finish_frame(fid, measurements=stars(3, 1.0), target="OJ287",
                       zeropoint={"zp": 24.5, "zp_err": 0.01, "n_stars": 12},
                       lightcurve_rows=[{"target": "OJ287", "band": "r", "mjd": 51544.5,
                                         "mag": 14.2, "mag_err": 0.01, "diff_mag": 0.3,
                                         "diff_mag_err": 0.005, "flags": 1024}])
    rows = list(store.db.query("SELECT * FROM lightcurve_ut"))
    assert len(rows) == 1
    row = rows[0]
    # MJD 51544.5 is the J2000.0 epoch, 2000-01-01 12:00 UTC
    assert row["ut_iso"] == "2000-01-01T12:00:00.000"
    assert (row["frame"], row["target"], row["band"]) == (17, "OJ287", "r")
    assert (row["zero_point"], row["diff_mag_err"], row["flags"]) == (24.5, 0.005, 1024)


def test_frame_states_view_shows_readable_times(store: Store) -> None:
    add_frame(store, 3)
    (row,) = store.db.query("SELECT * FROM frame_states")
    assert row["state"] == "arrived" and row["frame_number"] == 3
    assert dt.datetime.fromisoformat(row["first_seen_utc"]).year >= 2024


def test_flags_table_decodes_every_bit_photd_sets(store: Store) -> None:
    from photd import curves, lightcurve, photometry
    from photd.flags import FLAGS, decode

    table = {r["bit"]: r["name"] for r in store.db.query("SELECT * FROM flags")}
    assert table == {bit: name for bit, (name, _m) in FLAGS.items()}
    set_by_code = {photometry.EDGE, photometry.SATURATED, photometry.NEIGHBOUR,
                   photometry.COSMIC, photometry.NO_CENTROID, photometry.BAD_SKY,
                   photometry.NONPOSITIVE, photometry.OFF_FRAME, lightcurve.FEW_COMPARISONS,
                   curves.RELATIVE_WCS, curves.PROVISIONAL_CALIBRATION}
    assert set_by_code <= set(FLAGS)
    assert decode(8 | 1024) == ["cosmic_ray", "provisional_calibration"]


def test_a_target_is_decided_once_per_night(store: Store) -> None:
    add_frame(store, 1)  # records the night
    first = dict(ra_deg=133.7036, dec_deg=20.1085, source="catalog", status="refined",
                 offset_arcsec=0.1, runner_up_arcsec=40.0)
    assert store.record_target("2016-11-01", "OJ287", **first)
    assert not store.record_target("2016-11-01", "OJ287", **{**first, "ra_deg": 1.0})
    got = store.target_decision("2016-11-01", "OJ287")
    assert got["ra_deg"] == 133.7036 and got["source"] == "catalog"
    store.forget_target("2016-11-01", "OJ287")
    assert store.target_decision("2016-11-01", "OJ287") is None


# ---- maintenance ---------------------------------------------------------------


def test_backup_is_complete_consistent_and_atomic(store: Store, tmp_path: Path) -> None:
    fid = add_frame(store, 1)
    store.finish_frame(fid, measurements=stars(6, 1.0), target="M67")
    dest = tmp_path / "backups" / "photd-backup.sqlite"
    assert store.backup(dest) == dest
    store.finish_frame(fid, measurements=stars(2, 1.0))  # after the backup
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temp, no -wal
    with Store.open_readonly(dest) as copy:
        assert copy.integrity_check() == "ok"
        assert len(copy.measurements_for(target="M67")) == 6
        assert copy.schema_version() == store.schema_version()
    assert store.integrity_check() == "ok"
    busy, _, _ = store.checkpoint("truncate")
    assert busy == 0
    with pytest.raises(ValueError):
        store.checkpoint("; VACUUM")


def _damage(path: Path) -> None:
    """Overwrite the middle pages of a closed SQLite file with garbage (a disk fault)."""
    size = path.stat().st_size
    page = 4096
    assert size >= 4 * page, "the test store is too small to damage realistically"
    with open(path, "r+b") as fh:
        fh.seek(2 * page)
        fh.write(bytes(range(256)) * (page // 256) * 2)


def _filled_store(path: Path, frames: int = 40) -> None:
    with Store.open(path) as s:
        for k in range(frames):
            fid = add_frame(s, k + 1)
            s.finish_frame(fid, measurements=stars(30, 1.0 + k), target="M67")
        s.checkpoint("truncate")


def test_a_damaged_store_is_refused_at_open_naming_its_good_backup(tmp_path: Path) -> None:
    path = tmp_path / "photd.sqlite"
    _filled_store(path)
    with Store.open(path) as s:
        good = s.backup(tmp_path / "backup" / "photd.sqlite.bak")
    _damage(path)
    with pytest.raises(StoreDamaged) as err:
        Store.open(path, backups=backup_generations(good))
    assert err.value.backups == [good]
    assert str(good) in str(err.value) and str(path) in str(err.value)


def test_a_damaged_store_never_replaces_the_last_good_backup(tmp_path: Path) -> None:
    path = tmp_path / "photd.sqlite"
    _filled_store(path)
    dest = tmp_path / "backup" / "photd.sqlite.bak"
    with Store.open(path) as s:
        s.backup(dest)
    good_bytes = dest.read_bytes()
    # Damaged after the daemon opened it (the open-time check passed then):
    # a connection made past Store.open stands for it.
    _damage(path)
    s = Store(sqlite3.connect(path, isolation_level=None), path, readonly=False)
    with pytest.raises(StoreDamaged):
        s.backup(dest)
    s.close()
    assert dest.read_bytes() == good_bytes
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_backups_rotate_and_keep_three_generations(store: Store, tmp_path: Path) -> None:
    dest = tmp_path / "backup" / "photd.sqlite.bak"
    for k in range(5):
        add_frame(store, k + 1)
        store.backup(dest)
    names = sorted(p.name for p in dest.parent.iterdir())
    assert names == ["photd.sqlite.bak", "photd.sqlite.bak.1", "photd.sqlite.bak.2"]
    counts = []
    for gen in backup_generations(dest):
        with Store.open_readonly(gen) as copy:
            counts.append(sum(copy.counts().values()))
    assert counts == [5, 4, 3]  # newest first


def test_restore_from_backup_keeps_the_damaged_file_aside(tmp_path: Path) -> None:
    path = tmp_path / "photd.sqlite"
    _filled_store(path, frames=40)
    dest = tmp_path / "backup" / "photd.sqlite.bak"
    with Store.open(path) as s:
        s.backup(dest)
    damaged_bytes = path.read_bytes()
    _damage(path)
    damaged_bytes = path.read_bytes()
    got = restore_from_backup(path, backup_generations(dest))
    assert got is not None
    used, aside = got
    assert used == dest and aside.read_bytes() == damaged_bytes
    with Store.open(path) as s:
        assert s.quick_check() == "ok"
        assert s.counts() == {"done": 40}


def test_restore_without_a_good_backup_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "photd.sqlite"
    _filled_store(path)
    _damage(path)
    before = path.read_bytes()
    assert restore_from_backup(path, [tmp_path / "missing.bak"]) is None
    assert path.read_bytes() == before


def test_backup_refuses_a_folder_that_is_a_link_out_of_the_work_folder(
        store: Store, tmp_path: Path) -> None:
    outside = tmp_path.parent / (tmp_path.name + "-elsewhere")
    outside.mkdir()
    (store.path.parent / "backup").symlink_to(outside)
    with pytest.raises(StoreError, match="link"):
        store.backup(store.path.parent / "backup" / "photd.sqlite.bak")
    assert list(outside.iterdir()) == []


# ---- concurrency and crashes (real processes) -------------------------------------

READER = """
    import sys
    from photd.store import Store

    reader = Store.open_readonly(sys.argv[1])
    def transitions():
        return reader.conn.execute("SELECT count(*) FROM state_log").fetchone()[0]
    with reader.snapshot():
        first = transitions()
        print(first, flush=True)
        sys.stdin.readline()  # the writer commits while we hold the snapshot
        print(transitions(), reader.status_json()["counts"].get("done", 0), flush=True)
    print(transitions(), flush=True)
"""


def test_reader_snapshot_never_blocks_writer(db_path: Path) -> None:
    with Store.open(db_path) as writer:
        ids = [add_frame(writer, n) for n in range(1, 6)]
        proc = run_python(READER, str(db_path))
        try:
            before = int(proc.stdout.readline())
            assert before == 5
            slowest = 0.0
            for k in range(50):
                t0 = time.perf_counter()
                writer.set_state(ids[k % 5], "done" if k % 2 else "processing")
                slowest = max(slowest, time.perf_counter() - t0)
            assert slowest < 0.5, f"a commit waited {slowest:.3f} s behind a reader"
            proc.stdin.write("go\n")
            proc.stdin.flush()
            inside, done_inside = map(int, proc.stdout.readline().split())
            after = int(proc.stdout.readline())
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert inside == before and done_inside == 0  # the snapshot did not move
        assert after == before + 50
        assert writer.integrity_check() == "ok"


WRITER = """
    import sys
    from photd.store import Store

    store = Store.open(sys.argv[1])
    ids = [f["id"] for f in store.frames()]
    i = 0
    while True:
        i += 1
        fid = ids[i % len(ids)]
        store.finish_frame(
            fid,
            measurements=[{"star_id": f"s{k}", "flags": i, "flux_e": float(i)} for k in range(20)],
            lightcurve_rows=[{"mjd": 60000.0 + i, "flags": i}],
            zeropoint={"zp": float(i)},
            reason=f"iter {i}",
            target="M67",
        )
        if i == 30:
            print("running", flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.2])
def test_kill_9_mid_loop_leaves_whole_transactions_only(db_path: Path, delay_s: float) -> None:
    with Store.open(db_path) as s:
        for n in range(1, 5):
            add_frame(s, n)
    proc = run_python(WRITER, str(db_path))
    try:
        assert proc.stdout.readline().strip() == "running", proc.stderr.read()
        time.sleep(delay_s)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # A reader right after the crash (photd status) must work too.
    with Store.open_readonly(db_path) as reader:
        assert reader.integrity_check() == "ok"
        assert len(reader.frames()) == 4
    with Store.open(db_path) as s:
        assert s.integrity_check() == "ok"
        # The loop finishes the frames in turn, so the surviving iterations
        # are consecutive: nothing committed was lost, nothing half-written.
        iterations = sorted(int(f["reason"].removeprefix("iter ")) for f in s.frames())
        assert iterations[0] >= 27 and iterations == list(range(iterations[0], iterations[0] + 4))
        for frame in s.frames():
            fid = frame["id"]
            i = int(frame["reason"].removeprefix("iter "))
            rows = [m for m in s.measurements_for() if m["frame_id"] == fid]
            assert len(rows) == 20 and {m["flags"] for m in rows} == {i}
            assert s.zeropoint(fid)["zp"] == float(i)
            lc = s.conn.execute("SELECT flags FROM lightcurve WHERE frame_id = ?", [fid]).fetchall()
            assert lc == [(i,)]
