"""Aperture photometry against the simulator's truth.

Frames are calibrated here (and in the ``measured_night`` fixture of
conftest.py) with the TRUE bias pattern and flat and measured with the TRUE
WCS, so these tests judge photometry alone, not the calibration or
astrometry modules.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from photd import cosmics
from photd.config import PhotometryConfig
from photd.photometry import (
    COLUMNS,
    COSMIC,
    NEIGHBOUR,
    OFF_FRAME,
    SATURATED,
    measure_frame,
)

SATURATION_ADU = 65535


def calibrated_frame(root: Path, truth, band: str, number: int) -> tuple[np.ndarray, np.ndarray]:
    """(frame in electrons, saturation mask) from the raw file and the true patterns."""
    raw = fits.getdata(root / "raw" / band / f"xl126{band}_{number:04d}.fits")
    gain = truth.camera(band)["gain_e_per_adu"]
    data_e = (raw.astype(float) - truth.pattern("bias", band)) / truth.pattern("flat", band) * gain
    return data_e, raw >= SATURATION_ADU


def measure(root: Path, truth, frame: dict, data_e: np.ndarray | None = None,
            mask: np.ndarray | None = None, **kw):
    band, number = frame["band"], frame["number"]
    if data_e is None:
        data_e, mask = calibrated_frame(root, truth, band, number)
    tgt = next(t for t in truth.night["targets"] if t["name"] == frame["target"])
    cam = truth.camera(band)
    return measure_frame(
        data_e, wcs=truth.wcs(band, number), stars=catalog(root),
        target_radec=kw.pop("target_radec", (tgt["ra_deg"], tgt["dec_deg"])),
        fwhm_px=frame["fwhm_px"], gain_e_per_adu=cam["gain_e_per_adu"],
        rdnoise_e=cam["read_noise_e"], exptime_s=frame["exptime_s"], mask=mask,
        target_name=frame["target"], **kw)


@pytest.fixture(scope="module")
def night(measured_night):
    m = measured_night
    return m.root, m.truth, m.meas, m.summaries


def catalog(root: Path) -> Table:
    return Table.read(root / "catalog.ecsv")


def _brightest_clean(tab: Table) -> int:
    """Row of the brightest star measured without any flag."""
    return int(np.argmax(np.where(tab["flags"] == 0, tab["flux_e"], -np.inf)))


def with_truth(meas: Table, truth) -> Table:
    fs = truth.frame_stars["band", "frame", "id", "x", "y", "flux_e", "mag"]
    lookup = {(b, int(f), str(i)): k for k, (b, f, i) in
              enumerate(zip(fs["band"], fs["frame"], fs["id"], strict=True))}
    idx = np.array([lookup.get((b, int(f), str(s)), -1) for b, f, s in
                    zip(meas["band"], meas["frame"], meas["star_id"], strict=True)])
    out = meas[idx >= 0]
    k = idx[idx >= 0]
    for col in ("x", "y", "flux_e", "mag"):
        out[f"true_{col}"] = np.asarray(fs[col])[k]
    return out


def test_table_has_the_documented_columns_and_every_catalog_star_on_the_frame(night):
    root, truth, meas, _ = night
    f = truth.frames("object", "r")[0]
    tab, _summ = measure(root, truth, f)
    assert tuple(tab.colnames) == COLUMNS
    assert tab["star_id"][0] == f["target"]
    cat = catalog(root)
    x, y = truth.wcs("r", f["number"]).all_world2pix(cat["ra"], cat["dec"], 0)
    ny, nx = calibrated_frame(root, truth, "r", f["number"])[0].shape
    on = (x >= 0) & (x <= nx - 1) & (y >= 0) & (y <= ny - 1) & (cat["id"] != f["target"])
    assert set(tab["star_id"][1:]) == set(cat["id"][on])


def test_optimal_aperture_is_near_0p7_fwhm_with_a_negative_aperture_correction(night):
    _root, _truth, _meas, summaries = night
    good = [s for (b, n), s in summaries.items() if s.n_growth_stars >= 3]
    assert len(good) > 30
    ap = np.array([s.aperture_fwhm for s in good])
    assert 0.6 <= np.median(ap) <= 0.8
    apc = np.array([s.apcorr_mag for s in good])
    # A Moffat (beta 3) holds ~57 % of its light inside 0.7 FWHM: about -0.6 mag.
    assert np.all((apc < -0.4) & (apc > -0.85))
    assert np.median([s.apcorr_err_mag for s in good]) < 0.005


def test_centroids_of_bright_stars_land_on_the_true_positions(night):
    _root, truth, meas, _ = night
    m = with_truth(meas[(meas["flags"] == 0) & (meas["mag_inst_err"] < 0.01)], truth)
    d = np.hypot(m["x_px"] - m["true_x"], m["y_px"] - m["true_y"])
    assert np.median(d) < 0.05
    assert np.percentile(d, 95) < 0.15


def _frame_zero_removed(m: Table) -> np.ndarray:
    """measured - true instrumental mag, each frame's weighted mean removed."""
    dm = np.asarray(m["mag_inst"]) + 2.5 * np.log10(np.asarray(m["true_flux_e"]) / 300.0)
    out = np.full(len(m), np.nan)
    keys = np.char.add(np.asarray(m["band"]).astype(str), np.asarray(m["frame"]).astype(str))
    for key in np.unique(keys):
        s = keys == key
        w = 1 / (np.asarray(m["mag_inst_err"][s]) ** 2 + 0.002**2)
        d = dm[s]
        ok = np.abs(d - np.median(d)) < 0.1
        out[s] = d - (w[ok] * d[ok]).sum() / w[ok].sum()
    return out


def test_error_bars_of_constant_stars_are_honest(night):
    _root, truth, meas, _ = night
    varying = {t["name"] for t in truth.night["targets"]} | {
        t["variable_star"] for t in truth.night["targets"]}
    m = meas[(meas["flags"] == 0) & np.isfinite(meas["mag_inst"])
             & ~np.isin(meas["star_id"], list(varying)) & (meas["defect"] == "none")]
    m = with_truth(m, truth)
    m["res"] = _frame_zero_removed(m)
    stars = {}
    for key in set(zip(m["band"], m["star_id"], strict=True)):
        s = (m["band"] == key[0]) & (m["star_id"] == key[1])
        if s.sum() < 5:
            continue
        r, e = np.asarray(m["res"][s]), np.asarray(m["mag_inst_err"][s])
        mean = np.average(r, weights=1 / e**2)
        chi = np.sqrt(np.sum(((r - mean) / e) ** 2) / (s.sum() - 1))
        stars[key] = (float(np.median(m["true_mag"][s])), chi)
    mags = np.array([v[0] for v in stars.values()])
    chis = np.array([v[1] for v in stars.values()])
    ratios = {}
    for lo, hi in ((13.0, 17.0), (17.0, 18.5), (18.5, 19.5), (19.5, 20.5), (20.5, 22.0)):
        s = (mags >= lo) & (mags < hi)
        assert s.sum() >= 10, (lo, hi)
        # RMS of scatter/error over the stars of the bin (a robust centre would
        # hide real outliers: they count).
        ratios[(lo, hi)] = float(np.sqrt(np.mean(chis[s] ** 2)))
    for rng, ratio in ratios.items():
        assert 0.8 <= ratio <= 1.2, (rng, ratio, ratios)


def test_cosmic_rays_that_matter_are_flagged_in_the_aperture(night):
    root, truth, meas, _ = night
    cos = Table.read(root / "truth" / "cosmics.ecsv")
    m = with_truth(meas[(meas["defect"] == "none")], truth)
    hit_flagged, hits = 0, 0
    for b, f, x, y, e in zip(cos["band"], cos["frame"], cos["x"], cos["y"], cos["e"],
                             strict=True):
        s = np.flatnonzero((m["band"] == b) & (m["frame"] == f))
        if not len(s):
            continue
        d = np.hypot(m["x_px"][s] - x, m["y_px"][s] - y)
        k = s[np.argmin(d)]
        # A hit inside the aperture that would bias the flux by > 1 sigma.
        if d.min() < m["aperture_px"][k] - 0.5 and e > m["flux_err_e"][k]:
            hits += 1
            hit_flagged += bool(m["flags"][k] & COSMIC)
    assert hits >= 10
    assert hit_flagged / hits >= 0.9, (hit_flagged, hits)


def test_injected_cosmic_ray_is_flagged_and_does_not_bias_the_flux(night):
    root, truth, _meas, _ = night
    f = truth.frames("object", "r")[1]
    data_e, mask = calibrated_frame(root, truth, "r", f["number"])
    clean_tab, _ = measure(root, truth, f, data_e, mask)
    x, y = clean_tab["x_px"][0], clean_tab["y_px"][0]  # the target
    hit = data_e.copy()
    hit[int(round(y)) + 1, int(round(x)) - 1] += 4000.0
    hit_tab, _ = measure(root, truth, f, hit, mask)
    assert hit_tab["flags"][0] & COSMIC
    assert not clean_tab["flags"][0] & COSMIC
    diff = hit_tab["flux_e"][0] - clean_tab["flux_e"][0]
    assert abs(diff) < clean_tab["flux_err_e"][0], diff  # 4000 e- would be ~7 sigma


def test_masked_pixels_flag_the_star_saturated(night):
    root, truth, _meas, _ = night
    f = truth.frames("object", "g")[2]
    data_e, mask = calibrated_frame(root, truth, "g", f["number"])
    tab, _ = measure(root, truth, f, data_e, mask)
    k = _brightest_clean(tab)
    mask = mask.copy()
    mask[int(round(tab["y_px"][k])), int(round(tab["x_px"][k]))] = True
    tab2, _ = measure(root, truth, f, data_e, mask)
    assert tab2["flags"][k] & SATURATED
    assert tab2["star_id"][k] == tab["star_id"][k]


def test_a_star_with_a_bright_neighbour_in_its_aperture_is_flagged(night):
    root, truth, _meas, _ = night
    f = truth.frames("object", "r")[3]
    data_e, mask = calibrated_frame(root, truth, "r", f["number"])
    tab, _ = measure(root, truth, f, data_e, mask)
    k = _brightest_clean(tab)
    x, y = float(tab["x_px"][k]), float(tab["y_px"][k])
    shift = 4  # px, ~0.9 FWHM: the copy overlaps the star's aperture
    half = 20
    iy, ix = int(round(y)), int(round(x))
    stamp = data_e[iy - half:iy + half + 1, ix - half:ix + half + 1]
    blended = data_e.copy()
    blended[iy - half:iy + half + 1, ix - half + shift:ix + half + 1 + shift] += \
        stamp - np.median(stamp)
    ra, dec = truth.wcs("r", f["number"]).all_pix2world([[x + shift, y]], 0)[0]
    cat = catalog(root).copy()
    cat.add_row({"id": "NEW-COPY", "ra": ra, "dec": dec})
    cam = truth.camera("r")
    tgt = next(t for t in truth.night["targets"] if t["name"] == f["target"])
    tab2, _ = measure_frame(
        blended, wcs=truth.wcs("r", f["number"]), stars=cat,
        target_radec=(tgt["ra_deg"], tgt["dec_deg"]), fwhm_px=f["fwhm_px"],
        gain_e_per_adu=cam["gain_e_per_adu"], rdnoise_e=cam["read_noise_e"],
        exptime_s=f["exptime_s"], mask=mask, target_name=f["target"])
    row = tab2[tab2["star_id"] == tab["star_id"][k]][0]
    assert row["flags"] & NEIGHBOUR
    assert not tab["flags"][k] & NEIGHBOUR


def test_target_off_the_frame_gives_a_flagged_row(night):
    root, truth, _meas, _ = night
    f = truth.frames("object", "i")[0]
    tab, _ = measure(root, truth, f, target_radec=(10.0, -30.0))
    assert tab["star_id"][0] == f["target"]
    assert tab["flags"][0] == OFF_FRAME
    assert np.isnan(tab["flux_e"][0])


@pytest.mark.parametrize("fwhm_px", [3.0, 4.0])
def test_pixel_phase_term_matches_the_scatter_of_noiseless_simulated_stars(fwhm_px):
    # The simulator's own renderer (a pixel-integrated Moffat) at random
    # sub-pixel positions, measured in a 0.75-FWHM aperture at the true centre:
    # the scatter no photon count shows, which the error bars must carry.
    from photutils.aperture import CircularAperture

    from photd.photometry import pixel_phase_scatter
    from photd.simulate import MOFFAT_BETA, _add_star

    rng = np.random.default_rng(5)
    radius = 0.75 * fwhm_px
    sums = []
    for _ in range(300):
        img = np.zeros((48, 48))
        x, y = 24 + rng.uniform(0, 1), 24 + rng.uniform(0, 1)
        _add_star(img, x, y, 1e5, fwhm_px)
        sums.append(CircularAperture([(x, y)], radius).do_photometry(img)[0][0])
    measured = 1.0857 * np.std(sums) / np.mean(sums)
    assert measured > 1e-3  # 1-5 mmag: larger than a bright star's photon noise
    assert pixel_phase_scatter(fwhm_px, radius, MOFFAT_BETA) == pytest.approx(measured, rel=0.2)


def test_cosmic_ray_on_a_bright_core_is_flagged_and_repaired(night):
    # A hit on the core of a bright star hides under the star's own profile
    # from the neighbours test; the star's point symmetry gives it away.
    root, truth, meas, _ = night
    f = truth.frames("object", "r")[3]
    data_e, mask = calibrated_frame(root, truth, "r", f["number"])
    clean_tab, summ = measure(root, truth, f, data_e, mask)
    k = _brightest_clean(clean_tab)
    x, y = clean_tab["x_px"][k], clean_tab["y_px"][k]
    py, px = int(round(y + 1.2)), int(round(x - 0.8))
    hit = data_e.copy()
    energy = 0.2 * (data_e[py, px] - clean_tab["sky_e_per_px"][k])  # 20 % of the star there
    hit[py, px] += energy
    assert energy > 2.5 * clean_tab["flux_err_e"][k]  # would bias the flux by > 2.5 sigma
    blind, _ = measure(root, truth, f, hit, mask,
                       cfg=PhotometryConfig(cosmic_mirror_tolerance=1e9))
    assert not blind["flags"][k] & COSMIC  # the neighbours test alone misses it
    got, _ = measure(root, truth, f, hit, mask)
    assert got["flags"][k] & COSMIC
    assert abs(got["flux_e"][k] - clean_tab["flux_e"][k]) < clean_tab["flux_err_e"][k]


def _gaussian_star(peak_e: float, fwhm_px: float, x: float, y: float,
                   shape: tuple[int, int] = (41, 41), sky_e: float = 100.0) -> np.ndarray:
    """A noiseless Gaussian star on a flat sky, sampled at the pixel centres."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    sigma = fwhm_px / 2.3548200450309493
    return sky_e + peak_e * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))


def test_a_spike_on_the_sky_is_replaced_by_its_neighbours_and_a_star_peak_is_not_a_hit():
    img = _gaussian_star(5000.0, 4.0, 20.0, 20.0)
    img[5, 30] += 2000.0  # 40 sigma above a 100 e- sky with 5 e- read noise
    hits, clean, _ratio = cosmics.find_hits(img, np.zeros(img.shape, bool), 5.0,
                                            np.array([20.0]), np.array([20.0]), 4.0,
                                            PhotometryConfig())
    assert list(zip(*np.nonzero(hits), strict=True)) == [(5, 30)]
    assert clean[5, 30] == 100.0  # the 8 neighbours are flat sky
    others = np.ones(img.shape, bool)
    others[5, 30] = False
    assert np.array_equal(clean[others], img[others])  # the star's peak is untouched


def test_a_hit_on_a_bright_core_is_found_by_its_mirror_image_and_repaired_from_it():
    # On a star centred on a pixel the mirror of (x + 1, y) is the pixel (x - 1, y):
    # a clean core matches its mirror exactly, so only the hit stands out.
    star = _gaussian_star(20000.0, 4.0, 20.0, 20.0)
    img = star.copy()
    img[20, 21] += 6000.0  # above 5 sigma (~900 e-) plus 0.1 of the star's height (~1700 e-)
    cfg = PhotometryConfig()
    rows, cols = cosmics.bright_core_hits(img, np.zeros(img.shape, bool), np.array([20.0]),
                                          np.array([20.0]), np.array([100.0]),
                                          np.array([True]), 9.0, np.array([100.0]), 5.0, 4.0,
                                          cfg)
    assert list(zip(rows, cols, strict=True)) == [(20, 21)]
    hits = np.zeros(img.shape, bool)
    hits[rows, cols] = True
    repaired = cosmics.mirror_repair(img, img, hits, np.zeros(img.shape, bool),
                                     np.array([20.0]), np.array([20.0]), 9.0)
    assert repaired[20, 21] == pytest.approx(star[20, 21], rel=1e-12)
    # too faint, or without a trustworthy centre: no mirror test
    for snr, centred in ((20.0, True), (100.0, False)):
        rows, _ = cosmics.bright_core_hits(img, np.zeros(img.shape, bool), np.array([20.0]),
                                           np.array([20.0]), np.array([snr]),
                                           np.array([centred]), 9.0, np.array([100.0]), 5.0,
                                           4.0, cfg)
        assert len(rows) == 0
