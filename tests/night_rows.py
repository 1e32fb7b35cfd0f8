"""What a processed night left in its store, and the test that two nights are the same."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest


def store_rows(work: Path) -> dict:
    """Frame states, measured fluxes and light-curve points of ``work``'s store (checked sound).

    Keys are raw paths (with the star or target), so two work folders that processed the
    same raw night compare directly.
    """
    con = sqlite3.connect(work / "photd.sqlite")
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        meas = con.execute("SELECT f.path, m.star_id, m.flux_e FROM measurements m "
                           "JOIN frames f ON f.id = m.frame_id").fetchall()
        lc = con.execute("SELECT f.path, l.target, l.diff_mag FROM lightcurve l "
                         "JOIN frames f ON f.id = l.frame_id").fetchall()
        states = dict(con.execute("SELECT path, state FROM frames").fetchall())
    finally:
        con.close()
    keys = [(p, s) for p, s, _ in meas]
    assert len(keys) == len(set(keys)), "duplicate measurement rows"
    return {"measurements": {(p, s): f for p, s, f in meas},
            "lightcurve": {(p, t): d for p, t, d in lc}, "states": states}


def assert_same_night(got: dict, reference: dict, *, lightcurve_values: bool = False) -> None:
    """The same frame states, the same fluxes (to 1e-6), the same light-curve points."""
    assert got["states"] == reference["states"]
    assert got["measurements"].keys() == reference["measurements"].keys()
    for key, flux in reference["measurements"].items():
        assert got["measurements"][key] == pytest.approx(flux, rel=1e-6, abs=1e-6)
    assert got["lightcurve"].keys() == reference["lightcurve"].keys()
    if lightcurve_values:
        for key, mag in reference["lightcurve"].items():
            assert got["lightcurve"][key] == pytest.approx(mag, abs=1e-6)
