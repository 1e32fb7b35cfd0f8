"""Reference catalogs: file readers and the offline cache (never the network)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.table import Table

from photd.catalog import (
    COLUMNS,
    CatalogError,
    CatalogSource,
    CatalogUnavailable,
    cone,
    propagate_pm,
    read_catalog_file,
    tile_key,
)
from photd.config import CatalogConfig

CFG = CatalogConfig(retries=3, backoff_s=0.0)


def _survey_table() -> Table:
    t = Table()
    t["source_id"] = [101, 102, 103]
    t["RAJ2000"] = [10.0, 10.01, 10.5]
    t["DEJ2000"] = [20.0, 20.01, 20.5]
    t["gmag"] = [15.0, 16.0, 17.0]
    t["e_gmag"] = [0.01, 0.02, 0.03]
    t["r_mag"] = [14.5, 15.5, 16.5]
    t["phot_g_mean_mag"] = [14.7, 15.7, 16.7]
    t["flux_ratio"] = [1.0, 2.0, 3.0]  # an unknown extra column
    return t


@pytest.mark.parametrize("suffix,fmt", [(".ecsv", "ascii.ecsv"), (".fits", "fits"),
                                        (".csv", "ascii.csv")])
def test_survey_spellings_are_normalised_in_every_format(tmp_path, suffix, fmt):
    path = tmp_path / f"stars{suffix}"
    _survey_table().write(path, format=fmt)
    cat = read_catalog_file(path)
    assert list(cat.colnames) == list(COLUMNS)
    assert list(cat["id"]) == ["101", "102", "103"]
    assert cat["ra"][1] == pytest.approx(10.01)
    assert cat["g"][2] == pytest.approx(17.0)
    assert cat["g_err"][0] == pytest.approx(0.01)
    assert cat["r"][0] == pytest.approx(14.5)
    assert cat["G"][0] == pytest.approx(14.7)  # Gaia G is not SDSS g
    assert np.isnan(cat["i"]).all() and np.isnan(cat["pmra"]).all()


def test_ra_deg_dec_deg_and_g_mag_err_aliases(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("ra_deg,dec_deg,g_mag,gmag_err,pmra,pmdec,epoch\n"
                    "150.0,2.0,14.0,0.02,10.0,-5.0,2016.0\n")
    cat = read_catalog_file(path)
    assert cat["ra"][0] == 150.0 and cat["dec"][0] == 2.0
    assert cat["g"][0] == 14.0 and cat["g_err"][0] == 0.02
    assert cat["id"][0] == "1"


def test_file_without_ra_dec_names_file_and_its_columns(tmp_path):
    path = tmp_path / "nocoords.csv"
    path.write_text("name,x,y,gmag\nA,1,2,15\n")
    with pytest.raises(CatalogError, match=r"nocoords\.csv.*ra/dec.*name, x, y, gmag"):
        read_catalog_file(path)


def test_file_without_any_band_is_an_error(tmp_path):
    path = tmp_path / "nomags.ecsv"
    Table({"ra": [1.0], "dec": [2.0], "V": [12.0]}).write(path)
    with pytest.raises(CatalogError, match=r"nomags\.ecsv.*magnitude.*ra, dec, V"):
        read_catalog_file(path)


def test_simulated_catalog_reads_unchanged(tmp_path):
    t = Table({"id": ["a", "b"], "ra": [1.0, 2.0], "dec": [3.0, 4.0], "g": [15.0, 16.0],
               "r": [14.0, 15.0], "i": [13.5, 14.5], "G": [14.2, 15.2]})
    t.write(tmp_path / "c.ecsv")
    cat = read_catalog_file(tmp_path / "c.ecsv")
    assert list(cat["i"]) == [13.5, 14.5] and list(cat["id"]) == ["a", "b"]


def test_cone_keeps_stars_inside_the_radius():
    t = Table({"ra": [10.0, 10.0, 10.0], "dec": [20.0, 20.09, 20.11]})
    assert len(cone(t, 10.0, 20.0, 6.0)) == 2  # 0.1 deg = 6 arcmin


def test_proper_motion_moves_stars_to_the_epoch_and_nan_is_zero():
    t = Table({"ra": [10.0, 10.0], "dec": [60.0, 60.0], "pmra": [3600.0, np.nan],
               "pmdec": [-1800.0, np.nan], "epoch": [2016.0, 2016.0]})
    moved = propagate_pm(t, 2026.0)
    # 10 yr x 3.6"/yr in mu_alpha* = 36" on the sky = 72" of RA at dec 60.
    assert (moved["ra"][0] - 10.0) * 3600 == pytest.approx(72.0, rel=1e-6)
    assert (moved["dec"][0] - 60.0) * 3600 == pytest.approx(-18.0, rel=1e-6)
    assert moved["ra"][1] == 10.0 and moved["dec"][1] == 60.0


def _outage(*_args):
    raise TimeoutError("timed out")


def test_local_file_needs_no_network(tmp_path):
    path = tmp_path / "local.ecsv"
    _survey_table().write(path)
    src = CatalogSource(CFG, tmp_path / "work", local_file=path, fetch=_outage)
    stars = src.stars(10.0, 20.0, 3.0)
    assert list(stars["id"]) == ["101", "102"]


def test_prepopulated_cache_is_used_with_the_network_down(tmp_path):
    cfg = dataclasses.replace(CFG, cache_dir=str(tmp_path / "cache"))
    calls = []

    def fetch(ra, dec, radius, timeout):
        calls.append((ra, dec, radius, timeout))
        return _survey_table()

    # First night: online, the tiles land in the cache.
    first = CatalogSource(cfg, tmp_path / "work", fetch=fetch, sleep=lambda s: None)
    online = first.stars(10.0, 20.0, 3.0)
    assert len(online) == 2 and calls
    assert all(c[3] == cfg.timeout_s for c in calls)
    cached_files = sorted((tmp_path / "cache").glob("*.ecsv"))
    assert cached_files and not list((tmp_path / "cache").glob("*.part"))
    # Next night: the network is down, the cache answers the same.
    second = CatalogSource(cfg, tmp_path / "work", fetch=_outage, sleep=lambda s: None)
    offline = second.stars(10.0, 20.0, 3.0)
    assert sorted(offline["id"]) == sorted(online["id"])


def test_hand_written_cache_tile_is_read_without_network(tmp_path):
    cfg = dataclasses.replace(CFG, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    key = tile_key(10.01, 20.01, cfg.tile_deg)
    t = _survey_table()
    t.write(tmp_path / "cache" / f"tile_{cfg.tile_deg:g}_{key[0]}_{key[1]}.ecsv")
    src = CatalogSource(cfg, tmp_path / "work", fetch=_outage)
    # A 0.3' cone around star 102 lies inside that one tile.
    assert list(src.stars(10.01, 20.01, 0.3)["id"]) == ["102"]


def test_empty_cache_and_outage_raise_catalog_unavailable_after_retries(tmp_path):
    sleeps: list[float] = []
    attempts = []

    def fetch(*args):
        attempts.append(args)
        raise TimeoutError("timed out")

    cfg = dataclasses.replace(CFG, backoff_s=1.0, retries=3)
    src = CatalogSource(cfg, tmp_path / "work", fetch=fetch, sleep=sleeps.append)
    with pytest.raises(CatalogUnavailable) as err:
        src.stars(10.0, 20.0, 3.0)
    assert err.value.reason == "catalog_unavailable"
    assert len(attempts) == 3 and sleeps == [1.0, 2.0]  # backoff doubles
    # Within the hold-off the next frame does not wait for timeouts again.
    with pytest.raises(CatalogUnavailable):
        src.stars(10.0, 20.0, 3.0)
    assert len(attempts) == 3
    assert not (tmp_path / "work" / "catalog-cache").exists() or not list(
        (tmp_path / "work" / "catalog-cache").glob("*.ecsv"))


def test_name_resolution_is_cached(tmp_path):
    asked = []

    def resolver(name, timeout):
        asked.append(name)
        return (39.66, 16.62) if name == "PKS 0235+164" else None

    src = CatalogSource(CFG, tmp_path, resolver=resolver, fetch=_outage)
    assert src.resolve_name("PKS 0235+164") == (39.66, 16.62)
    assert src.resolve_name("nonesuch") is None
    offline = CatalogSource(CFG, tmp_path, resolver=lambda *a: _outage(), fetch=_outage)
    assert offline.resolve_name("pks  0235+164") == (39.66, 16.62)
    assert offline.resolve_name("nonesuch") is None
    assert asked == ["PKS 0235+164", "nonesuch"]
    with pytest.raises(CatalogUnavailable):
        offline.resolve_name("OJ 287")
