"""Zero points, the comparison ensemble, times and the exports, against the truth."""

from __future__ import annotations

import csv
import io
import math
import warnings

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import (
    EarthLocation,
    SkyCoord,
    get_body_barycentric,
)
from astropy.table import Table
from astropy.time import Time

import photd
from aavso_spec import validate_aavso
from photd import lightcurve
from photd.config import PhotometryConfig, SiteConfig
from photd.export import (
    AAVSO_FIELDS,
    AAVSO_FILTERS,
    CheckStar,
    plot_lightcurve,
    terminal_plot,
    to_aavso,
    to_csv,
    to_ecsv,
)
from photd.lightcurve import (
    calibrate,
    derive_lightcurve,
    fit_colour_term,
    times,
    zero_point,
)

CONTRACT = ("target,band,frame,mjd,bjd_tdb,mag,mag_err,diff_mag,diff_mag_err,airmass,"
            "fwhm_arcsec,aperture_px,flags")
# The published AAVSO Extended File Format (v1.2) data fields, in order.
AAVSO_PUBLISHED = ["NAME", "DATE", "MAG", "MERR", "FILT", "TRANS", "MTYPE", "CNAME", "CMAG",
                   "KNAME", "KMAG", "AMASS", "GROUP", "CHART", "NOTES"]


@pytest.fixture(scope="module")
def night(measured_night):
    return measured_night.root, measured_night.truth, measured_night.meas


def catalog(root) -> Table:
    return Table.read(root / "catalog.ecsv")


@pytest.fixture(scope="module")
def curves(night):
    root, truth, meas = night
    out = {}
    for band in "gri":
        mb = meas[meas["band"] == band]
        targets = tuple(t["name"] for t in truth.night["targets"])
        c, _err, _n = fit_colour_term(mb, catalog(root), band, exclude=targets)
        for t in truth.night["targets"]:
            mt = mb[mb["target"] == t["name"]]
            out[(t["name"], band)] = derive_lightcurve(
                mt, catalog(root), target=t["name"], band=band, colour_term=c)
    return out


def test_colour_terms_match_the_cameras(night):
    root, truth, meas = night
    for band in "gri":
        targets = tuple(t["name"] for t in truth.night["targets"])
        c, c_err, n = fit_colour_term(meas[meas["band"] == band], catalog(root), band,
                                      exclude=targets)
        true_c = truth.camera(band)["colour_term"]
        assert n > 100
        assert abs(c - true_c) < max(0.015, 3 * c_err), (band, c, true_c)


def test_calibrated_catalog_stars_match_their_true_magnitudes(night):
    root, truth, meas = night
    cat = catalog(root)
    stars = truth.stars
    true_mag = {b: dict(zip(stars["id"], stars[b], strict=True)) for b in "gri"}
    worst = 0.0
    for band in "gri":
        mb = meas[(meas["band"] == band) & (meas["defect"] == "none")]
        targets = tuple(t["name"] for t in truth.night["targets"])
        c, _e, _n = fit_colour_term(mb, cat, band, exclude=targets)
        per_star: dict[str, list[float]] = {}
        for frame in np.unique(mb["frame"]):
            mf = mb[mb["frame"] == frame]
            zp = zero_point(mf, cat, band, colour_term=c, exclude=targets)
            assert zp.n_stars >= 10 and zp.zp_err < 0.01
            cal = calibrate(mf, zp, cat, band)
            good = (cal["flags"] == 0) & (cal["mag_err"] < 0.01)
            for sid, m in zip(cal["star_id"][good], cal["mag"][good], strict=True):
                per_star.setdefault(str(sid), []).append(float(m))
        variables = {t["variable_star"] for t in truth.night["targets"]}
        diffs = [np.mean(v) - true_mag[band][s] for s, v in per_star.items()
                 if s in true_mag[band] and s not in variables and len(v) >= 3]
        assert len(diffs) >= 10
        worst = max(worst, float(np.max(np.abs(diffs))))
    assert worst < 0.02, worst


def _true_differential(truth, band: str, frame: int, target: str, comps: list[str],
                       weights: np.ndarray) -> float:
    fs = truth.frame_stars
    f = fs[(fs["band"] == band) & (fs["frame"] == frame)]
    mag = dict(zip(f["id"], f["mag"], strict=True))
    return mag[target] - float(np.sum(weights * np.array([mag[c] for c in comps])) / weights.sum())


def _comparison_weights(mt: Table, comps: list[str]) -> np.ndarray:
    """The ensemble's nightly weights: 1 / median error^2 of each comparison's clean points."""
    return np.array([1 / np.nanmedian(mt["mag_inst_err"][(mt["star_id"] == c)
                                                       & (mt["flags"] == 0)]) ** 2
                     for c in comps])


def test_target_differential_magnitudes_follow_the_true_light_curve(night, curves):
    _root, truth, meas = night
    chis, offsets = [], {}
    for (target, band), (rows, info) in curves.items():
        comps = info.comparison_ids
        assert len(comps) >= 2
        mt = meas[(meas["band"] == band) & (meas["target"] == target)]
        w = _comparison_weights(mt, comps)
        d, e = [], []
        for r in rows:
            if r["flags"] or not math.isfinite(r["diff_mag"]):
                continue
            d.append(r["diff_mag"] - _true_differential(truth, band, r["frame"], target,
                                                        comps, w))
            e.append(r["diff_mag_err"])
        d, e = np.array(d), np.array(e)
        assert len(d) >= 10, (target, band, len(d))
        offset = float(np.average(d, weights=1 / e**2))
        offsets[(target, band)] = offset
        chis.extend((d - offset) / e)
    assert max(abs(o) for o in offsets.values()) <= 0.01, offsets
    # Over ~70 points the ratio is known to about +-10 %: too large means
    # optimistic errors, too small means errors an observer would distrust.
    rms_chi = float(np.sqrt(np.mean(np.square(chis))))
    assert 0.7 <= rms_chi < 1.2, rms_chi


def test_the_planted_variable_comparison_is_rejected_with_a_reason(curves, night):
    _root, truth, _meas = night
    outcome = {}
    for (target, band), (_rows, info) in curves.items():
        var = next(t["variable_star"] for t in truth.night["targets"] if t["name"] == target)
        assert var not in info.comparison_ids, (target, band)
        # Either it was a candidate and its curve against the others gave it
        # away, or it never qualified, and the reason says why.
        if var in info.rejected:
            assert info.rejected[var].startswith("variable"), info.rejected[var]
            outcome[(target, band)] = "rejected"
        else:
            assert info.excluded.get(var), (target, band)
            outcome[(target, band)] = info.excluded[var]
    assert len(outcome) == 6
    # The simulator plants it bright, clean and near the target: a candidate
    # almost everywhere, so the rejection itself is what is tested.
    assert sum(v == "rejected" for v in outcome.values()) >= 5, outcome


def test_first_frames_of_the_night_give_a_quiet_and_correct_curve(night):
    """Live: after 1, 2 and 3 frames the curve is already usable, without warnings."""
    root, truth, meas = night
    cat = catalog(root)
    for t in truth.night["targets"]:
        for band in "gri":
            mt = meas[(meas["band"] == band) & (meas["target"] == t["name"])]
            frames = sorted(set(mt["frame"]))
            for k in (1, 2, 3):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    rows, info = derive_lightcurve(mt[np.isin(mt["frame"], frames[:k])], cat,
                                                   target=t["name"], band=band)
                assert [r["frame"] for r in rows] == frames[:k]
                if k < 3:
                    # Too few frames to judge a comparison's constancy: none is
                    # called variable yet, and its chi^2 is unknown, not zero.
                    assert not info.rejected
                    assert all(math.isnan(v) for v in info.chi2.values())
                comps = info.comparison_ids
                w = _comparison_weights(mt[np.isin(mt["frame"], frames[:k])], comps)
                for r in rows:
                    assert r["n_comparisons"] >= 2 and not r["flags"]
                    assert math.isfinite(r["mag"]) and 0 < r["diff_mag_err"] < 0.02
                    true = _true_differential(truth, band, r["frame"], t["name"], comps, w)
                    assert abs(r["diff_mag"] - true) < 0.01 + 4 * r["diff_mag_err"], (
                        t["name"], band, k, r["diff_mag"] - true)


def test_a_catalog_star_without_a_colour_does_not_spoil_the_colour_term(night):
    root, truth, meas = night
    cat = catalog(root).copy()
    cat["g"][::7] = np.nan  # a fallback catalog (Gaia-derived) lacks some magnitudes
    targets = tuple(t["name"] for t in truth.night["targets"])
    c, c_err, n = fit_colour_term(meas[meas["band"] == "r"], cat, "r", exclude=targets)
    assert n > 100 and abs(c - truth.camera("r")["colour_term"]) < max(0.015, 3 * c_err)


def test_rows_carry_the_ensemble_version_and_comparisons(curves):
    rows, info = curves[("PKS0235+164", "r")]
    assert info.ensemble_version == lightcurve.ensemble_version(info.comparison_ids)
    assert all(r["ensemble_version"] == info.ensemble_version for r in rows)
    assert rows[0]["comparison_ids"] == ";".join(info.comparison_ids)
    assert [r["frame"] for r in rows] == sorted(r["frame"] for r in rows)


def test_re_deriving_with_more_frames_revises_earlier_points_consistently(night):
    root, _truth, meas = night
    mt = meas[(meas["band"] == "i") & (meas["target"] == "PKS0235+164")]
    frames = sorted(set(mt["frame"]))
    early, info_early = derive_lightcurve(mt[np.isin(mt["frame"], frames[:4])], catalog(root),
                                          target="PKS0235+164", band="i", colour_term=0.04)
    full, info_full = derive_lightcurve(mt, catalog(root), target="PKS0235+164", band="i",
                                        colour_term=0.04)
    assert len(early) == 4 and len(full) == len(frames)
    if info_early.ensemble_version == info_full.ensemble_version:
        for a, b in zip(early, full, strict=False):
            assert a["diff_mag"] == pytest.approx(b["diff_mag"], abs=2e-3)
    # Whatever the ensemble, every point of one derivation uses the same one.
    assert {r["ensemble_version"] for r in full} == {info_full.ensemble_version}


def test_a_fixed_comparison_list_overrides_the_automatic_choice(night, curves):
    root, _truth, meas = night
    _rows, auto = curves[("OJ287", "r")]
    fixed = tuple(auto.comparison_ids[:2])
    cfg = PhotometryConfig(comparison_stars={"OJ287": fixed})
    mt = meas[(meas["band"] == "r") & (meas["target"] == "OJ287")]
    rows, info = derive_lightcurve(mt, catalog(root), target="OJ287", band="r", cfg=cfg)
    assert info.fixed and info.comparison_ids == sorted(fixed)
    assert all(r["n_comparisons"] <= 2 for r in rows)


def test_bjd_tdb_matches_a_hand_computed_light_travel_time():
    site = SiteConfig()
    ra, dec = 133.703625, 20.1085  # OJ 287
    start, exptime = "2016-11-01T17:20:00.000", 300.0
    mjd_mid, bjd = times(start, exptime, ra, dec, site)
    # Independently: Roemer delay = (observatory position from the barycentre) . n / c.
    loc = EarthLocation.from_geodetic(site.longitude_deg * u.deg, site.latitude_deg * u.deg,
                                      site.elevation_m * u.m)
    t = Time(start, scale="utc") + exptime / 2 * u.s
    obs_gcrs, _v = loc.get_gcrs_posvel(t)
    r = get_body_barycentric("earth", t) + obs_gcrs
    n = SkyCoord(ra, dec, unit="deg").cartesian
    delay_s = float((r.xyz.to(u.m).value @ n.xyz.value) / 299792458.0)
    expected = t.tdb.jd1 + t.tdb.jd2 + delay_s / 86400.0
    assert mjd_mid == pytest.approx(t.mjd, abs=1e-9)
    assert abs(bjd - expected) * 86400 < 1e-3
    assert abs(delay_s) < 510  # at most ~8.3 light minutes from the barycentre


def test_airmass_matches_the_simulator(night):
    _root, truth, _meas = night
    f = truth.frames("object", "r")[0]
    tgt = next(t for t in truth.night["targets"] if t["name"] == f["target"])
    am = lightcurve.airmass(f["mjd_mid"], tgt["ra_deg"], tgt["dec_deg"], SiteConfig())
    assert am == pytest.approx(f["airmass"], abs=0.01)


# --- exports -------------------------------------------------------------

def test_csv_header_is_exactly_the_contract(curves):
    rows, _info = curves[("PKS0235+164", "g")]
    text = to_csv(rows)
    lines = text.splitlines()
    assert lines[0] == CONTRACT
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == len(rows)
    assert float(parsed[0]["diff_mag"]) == pytest.approx(rows[0]["diff_mag"], abs=1e-4)


def test_ecsv_round_trips_with_times_units_and_integers(curves):
    rows, _info = curves[("OJ287", "i")]
    table = Table.read(to_ecsv(rows, meta={"observer": "test"}), format="ascii.ecsv")
    assert table.colnames[:13] == CONTRACT.split(",")
    assert isinstance(table["mjd"], Time) and table["mjd"].scale == "utc"
    assert isinstance(table["bjd_tdb"], Time) and table["bjd_tdb"].scale == "tdb"
    assert table["mjd"][0].mjd == pytest.approx(rows[0]["mjd"], abs=1e-9)
    assert str(table["mag"].unit) == "mag" and str(table["fwhm_arcsec"].unit) == "arcsec"
    assert table["frame"].dtype.kind == "i" and table["flags"].dtype.kind == "i"
    # comparison_ids "a;b;c" stays one string per row
    assert table["comparison"][0] == rows[0]["comparison_ids"]
    assert table.meta["observer"] == "test"
    assert len(table) == len(rows)


def test_aavso_report_passes_the_spec_checks(curves):
    rows = curves[("OJ287", "r")][0] + curves[("OJ287", "g")][0]
    rows = sorted(rows, key=lambda r: (r["mjd"], r["band"]))
    text = to_aavso(rows, observer_code="XLOBS",
                    check_stars={"r": CheckStar("F1-0001", "test")})
    problems, records = validate_aavso(text)
    assert problems == []
    params = dict(line[1:].split("=", 1) for line in text.splitlines()
                  if line.startswith("#") and "=" in line and line[1:].split("=")[0].isupper())
    assert params["TYPE"] == "EXTENDED" and params["DATE"] == "JD"
    assert params["OBSTYPE"] == "CCD" and params["OBSCODE"] == "XLOBS"
    assert params["SOFTWARE"] == f"photd {photd.__version__}"
    assert list(AAVSO_FIELDS) == AAVSO_PUBLISHED
    assert len(records) == sum(math.isfinite(r["mag"]) for r in rows)
    assert {r["FILTER"] for r in records} == {"SG", "SR"}
    assert {r["TRANS"] for r in records} == {"NO"}  # no transformation was asked for
    assert {r["CNAME"] for r in records} == {"ENSEMBLE"}
    # the ensemble's stars are listed (they were always empty: a field-name mismatch)
    comps = rows[0]["comparison_ids"].split(";")
    assert comps and all(" ".join(comps) in r["NOTES"] for r in records
                         if r["FILTER"] == AAVSO_FILTERS[rows[0]["band"]])
    # g and r of one exposure share a GROUP
    groups = {}
    for r in records:
        groups.setdefault(r["GROUP"], set()).add(r["FILTER"])
    assert any(v == {"SG", "SR"} for g, v in groups.items() if g != "na")


def test_aavso_refuses_a_missing_observer_code_and_a_forbidden_delimiter(curves):
    rows = curves[("OJ287", "r")][0]
    with pytest.raises(ValueError, match="observer code"):
        to_aavso(rows, observer_code="")
    with pytest.raises(ValueError, match="delim"):
        to_aavso(rows, observer_code="XLOBS", delim="|")


def test_the_spec_checker_catches_what_the_spec_forbids():
    good = ("#TYPE=EXTENDED\n#OBSCODE=XLO\n#SOFTWARE=photd 0\n#DELIM=,\n#DATE=JD\n"
            "#OBSTYPE=CCD\nOJ287,2457694.223958,15.381,0.003,SG,NO,STD,ENSEMBLE,na,na,na,"
            "2.3939,na,na,na\n")
    assert validate_aavso(good)[0] == []
    for bad in (good.replace("#DATE=JD", "#DATE=BJD"), good.replace(",SG,", ",g,"),
                good.replace("15.381", "15"), good.replace(",NO,", ",MAYBE,"),
                good.replace("ENSEMBLE,na", "ENSEMBLE,12.1"), good.replace("2.3939,", ","),
                good.replace("#TYPE=EXTENDED\n", ""), good + "\n"):
        assert validate_aavso(bad)[0], bad


def test_plot_is_written_atomically_and_the_terminal_plot_is_small(curves, tmp_path):
    rows_by_band = {b: curves[("PKS0235+164", b)][0] for b in "gri"}
    comps = {b: curves[("PKS0235+164", b)][1].curves for b in "gri"}
    out = plot_lightcurve(rows_by_band, comps, tmp_path / "plots" / "pks.png", title="PKS")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["pks.png"]  # no temporary left
    text = terminal_plot(rows_by_band["r"], width=40, height=8)
    lines = text.splitlines()
    assert len(lines) == 10 and all(len(line) <= 40 + 12 for line in lines[:8])
    assert text.count("*") >= 5
