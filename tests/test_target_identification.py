"""The target is measured where it is, whatever coordinates the observer typed.

Two simulated nights through a real ``photd run``: the paper's own habit
(Table 1 cuts the seconds: OJ 287 as ``08:54:48 +20:06:30``, 12" off) with a
star catalog that does not list the targets, and a log that gives the
telescope's pointing (30-60" off) with a catalog that lists the targets by
SIMBAD's spelling (``OJ 287``). Checked against the simulator's truth.
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
from astropy.table import Table

from photd.flags import TARGET_AMBIGUOUS
from photd.simulate import SimOptions, simulate_night


def _night(tmp: Path, **opts) -> tuple[Path, sqlite3.Connection]:
    night = tmp / "night"
    simulate_night(night, SimOptions(seed=7, small=True, science_per_target=4, n_bias=4,
                                     n_flat=4, n_dark=0, **opts))
    work = tmp / "work"
    out = subprocess.run([sys.executable, "-m", "photd", "run", "--watch", str(night / "raw"),
                          "--work", str(work), "--catalog", str(night / "catalog.ecsv"),
                          "--until-idle", "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    con = sqlite3.connect(work / "photd.sqlite")
    con.row_factory = sqlite3.Row
    return night, con


def _truth(night: Path) -> tuple[dict, Table]:
    truth = json.loads((night / "truth" / "night.json").read_text())
    return ({t["name"]: SkyCoord(t["ra_deg"], t["dec_deg"], unit="deg")
             for t in truth["targets"]}, Table.read(night / "truth" / "frame_stars.ecsv"))


def _mag_minus_truth(con: sqlite3.Connection, stars: Table, target: str) -> np.ndarray:
    out = []
    for r in con.execute("SELECT l.band, l.mag, f.frame_number FROM lightcurve l JOIN frames f"
                         " ON f.id = l.frame_id WHERE l.target = ? AND l.mag IS NOT NULL",
                         (target,)):
        sel = (stars["band"] == r["band"]) & (stars["frame"] == r["frame_number"]) \
            & (stars["id"] == target)
        out.append(r["mag"] - float(stars["mag"][sel][0]))
    return np.array(out)


@pytest.fixture(scope="module")
def pointing_night(tmp_path_factory):
    return _night(tmp_path_factory.mktemp("pointing"), log_coords="pointing",
                  catalog_targets="spaced")


@pytest.fixture(scope="module")
def rounded_night(tmp_path_factory):
    return _night(tmp_path_factory.mktemp("rounded"), log_coords="rounded",
                  catalog_targets="none")


def test_a_log_giving_the_pointing_measures_the_catalogs_named_target(pointing_night):
    night, con = pointing_night
    true_pos, stars = _truth(night)
    decided = {r["target"]: r for r in con.execute("SELECT * FROM targets")}
    assert set(decided) == set(true_pos)
    for name, row in decided.items():
        assert (row["source"], row["status"], row["catalog_id"]) == \
            ("catalog", "refined", name.replace("OJ", "OJ ").replace("PKS", "PKS "))
        here = SkyCoord(row["ra_deg"], row["dec_deg"], unit="deg")
        assert here.separation(true_pos[name]).arcsec < 0.3
        d = _mag_minus_truth(con, stars, name)
        assert len(d) >= 6  # 4 frames x 3 bands, less the designed defects
        # calibrated magnitudes: the zero point's own error is ~0.01 mag on small frames
        assert abs(d.mean()) < 0.02 and d.std() < 0.03, (name, d)


def test_the_target_s_catalog_row_is_never_a_field_or_comparison_star(pointing_night):
    _night_dir, con = pointing_night
    ids = {r[0] for r in con.execute("SELECT DISTINCT star_id FROM measurements")}
    assert "OJ 287" not in ids and "PKS 0235+164" not in ids
    for (comparison,) in con.execute("SELECT comparison FROM lightcurve"):
        assert not {"OJ 287", "PKS 0235+164"} & set(json.loads(comparison or "[]"))


@pytest.mark.xfail(strict=False, reason="the deeper detection pass finds a faint source near "
                   "the cut-off position on this seed, so position alone calls it ambiguous; "
                   "needs a brightness or catalog prior (open, see the issue note)")
def test_the_papers_rounded_coordinates_are_refined_onto_oj287(rounded_night):
    night, con = rounded_night
    true_pos, stars = _truth(night)
    row = con.execute("SELECT * FROM targets WHERE target = 'OJ287'").fetchone()
    assert (row["source"], row["status"]) == ("log", "refined")
    assert row["offset_arcsec"] == pytest.approx(12.27, abs=0.3)  # the paper's 12"
    assert SkyCoord(row["ra_deg"], row["dec_deg"], unit="deg").separation(
        true_pos["OJ287"]).arcsec < 0.3
    d = _mag_minus_truth(con, stars, "OJ287")
    assert len(d) >= 6 and abs(d.mean()) < 0.02


def test_an_ambiguous_rounded_position_is_flagged_not_passed_off(rounded_night):
    # PKS 0235+164's cut-off position (13.4" off) has a field star 1.6" farther
    # than the blazar: position alone cannot tell them apart.
    _night_dir, con = rounded_night
    row = con.execute("SELECT * FROM targets WHERE target = 'PKS0235+164'").fetchone()
    assert row["status"] == "ambiguous"
    assert row["runner_up_arcsec"] - row["offset_arcsec"] < 3.0
    flags = [f for (f,) in con.execute(
        "SELECT flags FROM measurements WHERE star_id = 'PKS0235+164'")]
    assert flags and all(f & TARGET_AMBIGUOUS for f in flags)
