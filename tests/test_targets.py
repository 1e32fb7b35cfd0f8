"""Target identification from what observers give (names, rounded or pointing coordinates)."""

from __future__ import annotations

import math

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.table import Table

from photd.obslog import parse_line
from photd.targets import (
    AMBIGUOUS,
    NOT_FOUND,
    REFINED,
    TargetPosition,
    catalog_rows_named,
    choose_position,
    name_key,
    refine,
    same_name,
)

# OJ 287 (SIMBAD, ICRS): 08 54 48.87 +20 06 30.6. The paper's Table 1 types it
# rounded, as observers do:
PAPER_LINE = "96,114,OJ287,300,08:54:48,+20:06:30"
OJ287 = SkyCoord("08h54m48.87s", "+20d06m30.6s")


def test_names_match_without_case_spaces_or_punctuation() -> None:
    assert same_name("OJ 287", "OJ287")
    assert same_name("oj-287", "OJ 287")
    assert same_name("PKS 0235+164", "pks0235164")
    assert not same_name("OJ 287", "OJ 288")
    assert not same_name("", "")  # an empty name names nothing
    assert name_key("  M 67 ") == "m67"


def test_the_papers_rounded_log_position_is_twelve_arcsec_from_oj287() -> None:
    entry = parse_line(PAPER_LINE, 1, "night.log")
    logged = SkyCoord(entry.ra_deg, entry.dec_deg, unit="deg")
    # 0.87 s of RA at Dec +20.1 is 0.87 * 15 * cos(20.1 deg) = 12.25", plus 0.6" in Dec
    assert logged.separation(OJ287).arcsec == pytest.approx(math.hypot(12.254, 0.6), abs=0.05)


def test_position_comes_from_config_then_catalog_then_simbad_then_log() -> None:
    stars = Table({"id": ["gaia:1", "OJ 287"], "ra": [133.6, OJ287.ra.deg],
                   "dec": [20.0, OJ287.dec.deg], "r": [15.0, 14.5]})
    log = (133.7, 20.108333)
    simbad = (133.70362, 20.10850)
    kw = dict(stars=stars, simbad_radec=simbad, log_radec=log)
    got = choose_position("OJ287", config_targets={"oj 287": [1.0, 2.0]}, **kw)
    assert (got.source, got.ra_deg, got.dec_deg) == ("config", 1.0, 2.0)
    got = choose_position("OJ287", config_targets={}, **kw)
    assert got.source == "catalog" and got.catalog_id == "OJ 287"
    assert got.ra_deg == pytest.approx(OJ287.ra.deg)
    got = choose_position("OJ287", config_targets={}, **{**kw, "stars": stars[:1]})
    assert (got.source, got.ra_deg) == ("simbad", simbad[0])
    got = choose_position("OJ287", config_targets={}, stars=None, simbad_radec=None,
                          log_radec=log)
    assert (got.source, got.ra_deg) == ("log", log[0])
    assert choose_position("OJ287", config_targets={}, stars=None, simbad_radec=None,
                           log_radec=None) is None


def test_a_catalog_row_is_the_target_by_its_id_or_name_column() -> None:
    stars = Table({"id": ["1", "2", "3"], "name": ["", "OJ287", ""], "ra": [1.0, 2.0, 3.0],
                   "dec": [0.0, 0.0, 0.0]})
    assert catalog_rows_named(stars, "OJ 287").tolist() == [False, True, False]
    assert catalog_rows_named(stars, "3").tolist() == [False, False, True]


def _around(center: SkyCoord, offsets_arcsec: list[tuple[float, float]]) -> tuple:
    """Sources at (east, north) offsets in arcsec from ``center``: (ra_deg, dec_deg)."""
    pts = [center.spherical_offsets_by(dx * u.arcsec, dy * u.arcsec)
           for dx, dy in offsets_arcsec]
    return (np.array([p.ra.deg for p in pts]), np.array([p.dec.deg for p in pts]))


def test_refine_moves_the_papers_rounded_position_onto_oj287() -> None:
    entry = parse_line(PAPER_LINE, 1, "night.log")
    prior = TargetPosition("OJ287", entry.ra_deg, entry.dec_deg, "log")
    # OJ 287 itself and field stars 40" and 70" away
    ra, dec = _around(OJ287, [(0.0, 0.0), (40.0, 5.0), (-30.0, -63.0)])
    got = refine(prior, ra, dec, search_arcsec=15.0, fwhm_arcsec=2.0)
    assert got.status == REFINED
    assert SkyCoord(got.ra_deg, got.dec_deg, unit="deg").separation(OJ287).arcsec < 1e-6
    assert got.offset_arcsec == pytest.approx(12.27, abs=0.05)
    assert got.runner_up_arcsec > 30


def test_refine_keeps_the_prior_when_two_sources_are_equally_near() -> None:
    prior = TargetPosition("X", OJ287.ra.deg, OJ287.dec.deg, "log")
    ra, dec = _around(OJ287, [(8.0, 0.0), (-8.5, 1.0)])
    got = refine(prior, ra, dec, search_arcsec=15.0, fwhm_arcsec=2.0)
    assert got.status == AMBIGUOUS
    assert (got.ra_deg, got.dec_deg) == (prior.ra_deg, prior.dec_deg)
    assert got.offset_arcsec == pytest.approx(8.0, abs=0.01)
    assert got.runner_up_arcsec == pytest.approx(math.hypot(8.5, 1.0), abs=0.01)


def test_refine_says_when_nothing_is_within_reach() -> None:
    prior = TargetPosition("X", OJ287.ra.deg, OJ287.dec.deg, "log")
    ra, dec = _around(OJ287, [(60.0, 0.0)])
    got = refine(prior, ra, dec, search_arcsec=15.0, fwhm_arcsec=2.0)
    assert got.status == NOT_FOUND and got.offset_arcsec == pytest.approx(60.0, abs=0.01)
    assert refine(prior, np.array([]), np.array([]), search_arcsec=15.0,
                  fwhm_arcsec=2.0).status == NOT_FOUND
