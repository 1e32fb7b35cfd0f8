"""A field that no catalog covers: frames registered to the night's first frame.

The daemon runs as a user runs it (a real ``photd run`` process on a simulated
night). "No catalog and no network" is made without touching the network: the
local catalog file (``paths.catalog``) covers only the OJ287 field, so the
PKS0235+164 field has no reference star at all; with a local file the daemon
never asks an online service, and ``catalog.cache_dir`` is an empty folder.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from photd.curves import RELATIVE_WCS
from photd.simulate import SimOptions, load_truth, simulate_night

# Seed 14: the telescope points 14" from PKS0235+164 and the nearest other
# detectable star is 50" from the pointing, so the source nearest the log's
# coordinates on the reference frame is the target (the only way to tell the
# target without a catalog; see photd.pipeline.relative_reference).
NIGHT = SimOptions(seed=14, small=True, science_per_target=4, n_bias=3, n_flat=3, n_dark=0)
OFFLINE = "PKS0235+164"
COVERED = "OJ287"


def _config(tmp: Path, night: Path, catalog: Path) -> Path:
    (tmp / "empty-cache").mkdir(exist_ok=True)
    lines = ["[paths]", f"watch = [{str(night / 'raw')!r}]", f"work = {str(tmp / 'work')!r}",
             f"catalog = {str(catalog)!r}",
             "[catalog]", f"cache_dir = {str(tmp / 'empty-cache')!r}",
             "[daemon]", "rescan_interval_s = 2.0", 'log_format = "json"']
    path = tmp / "photd.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(cfg: Path) -> None:
    with open(cfg.parent / "daemon.log", "a") as log:
        out = subprocess.run([sys.executable, "-m", "photd.cli", "run", "--config", str(cfg),
                              "--until-idle", "5"], stdout=subprocess.DEVNULL, stderr=log,
                             timeout=600)
    assert out.returncode == 0, (cfg.parent / "daemon.log").read_text()[-3000:]


def _rows(work: Path, sql: str) -> list[dict]:
    con = sqlite3.connect(work / "photd.sqlite")
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql)]
    finally:
        con.close()


def _science(work: Path, target: str) -> list[dict]:
    return _rows(work, "SELECT f.id, f.band, f.frame_number, f.state, f.reason, f.output, "
                       "s.relative, s.header FROM frames f LEFT JOIN solutions s ON "
                       f"s.frame_id = f.id WHERE f.target = '{target}' AND f.kind = 'object'")


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("offline")
    night = tmp / "night"
    simulate_night(night, NIGHT)
    full = Table.read(night / "catalog.ecsv")
    truth = load_truth(night)
    pks = next(t for t in truth.night["targets"] if t["name"] == OFFLINE)
    far = SkyCoord(full["ra"], full["dec"], unit="deg").separation(
        SkyCoord(pks["ra_deg"], pks["dec_deg"], unit="deg")).arcmin > 30
    partial = tmp / "oj287-only.ecsv"
    full[far].write(partial)
    cfg = _config(tmp, night, partial)
    _run(cfg)
    return tmp, night, truth, cfg


def test_field_without_catalog_is_measured_in_a_relative_wcs(offline_run):
    tmp, _night, truth, _cfg = offline_run
    work = tmp / "work"
    frames = _science(work, OFFLINE)
    assert len(frames) == 3 * NIGHT.science_per_target
    for f in frames:
        defect = truth.frame(f["band"], f["frame_number"])["defect"]
        if defect:
            assert f["state"] == "badfit", f  # the gate still works without a catalog
            continue
        assert f["state"] == "done", f
        assert f["relative"] in (1, 2) and f["reason"].startswith("relative_wcs"), f
        assert fits.getheader(f["output"])["WCSREL"] is True
    # one reference frame per band, and it is the band's first frame
    for band in "gri":
        refs = [f for f in frames if f["band"] == band and f["relative"] == 2]
        assert [r["frame_number"] for r in refs] == [min(f["frame_number"] for f in frames
                                                         if f["band"] == band)]
    # the covered field is measured against its catalog as always
    covered = [f for f in _science(work, COVERED) if f["state"] == "done"]
    assert covered and all(f["relative"] == 0 for f in covered)


def test_relative_light_curve_follows_the_truth_and_is_flagged(offline_run):
    tmp, _night, truth, _cfg = offline_run
    work = tmp / "work"
    fs = truth.frame_stars
    report = []
    for band in "gri":
        rows = _rows(work, "SELECT f.frame_number, l.mag, l.diff_mag, l.diff_mag_err, l.flags "
                           "FROM lightcurve l JOIN frames f ON f.id = l.frame_id WHERE "
                           f"l.target = '{OFFLINE}' AND l.band = '{band}' ORDER BY f.frame_number")
        good = [f["number"] for f in truth.frames("object", band)
                if f["target"] == OFFLINE and not f["defect"]]
        assert [r["frame_number"] for r in rows] == good
        assert all(r["flags"] & RELATIVE_WCS for r in rows)
        assert all(r["mag"] is None for r in rows)  # no zero point without a catalog
        true = np.array([float(fs["mag"][(fs["band"] == band) & (fs["frame"] == n)
                                         & (fs["id"] == OFFLINE)][0]) for n in good])
        got = np.array([r["diff_mag"] for r in rows], float)
        err = np.array([r["diff_mag_err"] for r in rows], float)
        resid = (got - got.mean()) - (true - true.mean())
        report.append((band, np.round(resid, 4).tolist(), np.round(err, 4).tolist()))
        assert np.all(np.abs(resid) < 3 * err + 0.01), report
    # the light curve spans the target's real variation, not a flat line
    assert np.ptp(true) > 0.05


def test_relative_wcs_keeps_relative_positions_and_finds_the_target(offline_run):
    tmp, _night, truth, _cfg = offline_run
    work = tmp / "work"
    stars = {str(i): (float(r), float(d)) for i, r, d in
             zip(truth.stars["id"], truth.stars["ra"], truth.stars["dec"], strict=True)}
    fs = truth.frame_stars
    for f in _science(work, OFFLINE):
        if f["state"] != "done":
            continue
        wcs = WCS(fits.getheader(f["output"]), naxis=2)
        sel = (fs["band"] == f["band"]) & (fs["frame"] == f["frame_number"])
        ny, nx = NIGHT.shape
        on = sel & (fs["x"] > 0) & (fs["x"] < nx - 1) & (fs["y"] > 0) & (fs["y"] < ny - 1)
        x, y = np.asarray(fs["x"][on], float), np.asarray(fs["y"][on], float)
        fitted = wcs.pixel_to_world(x, y)
        real = SkyCoord([stars[str(i)] for i in fs["id"][on]], unit="deg")
        dra, ddec = real.spherical_offsets_to(fitted)
        dra, ddec = dra.arcsec, ddec.arcsec
        # the absolute offset is the pointing error (up to ~1'); what remains is small
        assert np.hypot(dra.mean(), ddec.mean()) < 120
        spread = np.hypot(dra - dra.mean(), ddec - ddec.mean())
        assert np.sqrt(np.mean(spread**2)) < 1.5 and spread.max() < 3.0, f
        # the target row sits on the real target (within a pixel or two)
        row = _rows(work, f"SELECT x_px, y_px FROM measurements WHERE frame_id = {f['id']} "
                          f"AND star_id = '{OFFLINE}'")[0]
        k = np.flatnonzero(sel & (fs["id"] == OFFLINE))[0]
        assert np.hypot(row["x_px"] - fs["x"][k], row["y_px"] - fs["y"][k]) < 2.0


def test_catalog_that_arrives_later_remeasures_the_field_absolutely(offline_run):
    tmp, night, truth, _cfg = offline_run
    work = tmp / "work"
    before = {f["id"]: json.loads(f["header"])["RELREFID"]
              for f in _science(work, OFFLINE) if f["state"] == "done"}
    assert len(set(before.values())) == 3  # one reference per band, kept in the store
    cfg = _config(tmp, night, night / "catalog.ecsv")  # the full catalog: now covered
    _run(cfg)
    frames = _science(work, OFFLINE)
    done = [f for f in frames if f["state"] == "done"]
    assert {f["id"] for f in done} == set(before)
    assert all(f["relative"] == 0 and f["reason"] is None for f in done)
    rows = _rows(work, f"SELECT mag, flags FROM lightcurve WHERE target = '{OFFLINE}'")
    assert len(rows) == len(done)
    assert all(not r["flags"] & RELATIVE_WCS and r["mag"] is not None for r in rows)
