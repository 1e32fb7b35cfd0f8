"""The simulator against its own stated physics (the truth every other test relies on)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS

from photd.simulate import (
    CAMERAS,
    FULL_SHAPE,
    SMALL_BINNING,
    SimOptions,
    build_jobs,
    make_sky,
    plan_night,
    render,
)


def _raw(night, band, number):
    return fits.getdata(night / "raw" / band / f"xl126{band}_{number:04d}.fits").astype(float)


def test_raw_frames_are_16_bit_with_camera_only_headers(small_night, small_truth):
    path = small_night / "raw" / "r" / "xl126r_0025.fits"
    raw_header = fits.getheader(path)
    assert raw_header["BITPIX"] == 16 and raw_header["BZERO"] == 32768
    assert (raw_header["NAXIS2"], raw_header["NAXIS1"]) == (
        FULL_SHAPE[0] // SMALL_BINNING, FULL_SHAPE[1] // SMALL_BINNING)
    assert raw_header["FRAMENUM"] == 25 and "DATE-OBS" in raw_header
    for key in ("RA", "DEC", "OBJECT", "IMAGETYP", "FILTER"):
        assert key not in raw_header


def test_bias_mean_and_noise_match_the_stated_level_and_read_noise(small_night, small_truth):
    for band in "gri":
        cam = small_truth.camera(band)
        pattern = small_truth.pattern("bias", band)
        resid = _raw(small_night, band, 3) - pattern
        mean, _median, std = sigma_clipped_stats(resid, sigma=4)
        # the bias level wanders by 0.3 ADU rms between frames (stated in the simulator)
        assert abs(mean) < 1.5
        expected = cam["read_noise_e"] / cam["gain_e_per_adu"]
        assert std == pytest.approx(expected, rel=0.05)
        assert np.median(pattern) == pytest.approx(cam["bias_level_adu"], abs=5)


def test_sky_flats_are_between_15k_and_30k_adu(small_night, small_truth):
    levels = []
    for f in small_truth.frames("flat", "g"):
        data = _raw(small_night, "g", f["number"]) - small_truth.pattern("bias", "g")
        levels.append(np.median(data))
    assert min(levels) > 14000 and max(levels) < 31000
    assert len(levels) == 10


def test_star_flux_in_large_aperture_matches_truth_within_poisson_error(small_night,
                                                                       small_truth):
    band, number = "r", 26
    fr = small_truth.frame(band, number)
    cam = small_truth.camera(band)
    dark_e = small_truth.pattern("dark", band) * fr["exptime_s"]
    flat = small_truth.pattern("flat", band)
    electrons = ((_raw(small_night, band, number) - small_truth.pattern("bias", band))
                 * cam["gain_e_per_adu"] - dark_e) / flat
    cr = small_truth.cosmics
    cr = cr[(cr["band"] == band) & (cr["frame"] == number)]
    fs = small_truth.frame_stars
    stars = fs[(fs["band"] == band) & (fs["frame"] == number)]
    ny, nx = electrons.shape
    radius = 6 * fr["fwhm_px"]
    yy, xx = np.mgrid[0:ny, 0:nx]
    checked = 0
    for s in stars[np.argsort(stars["flux_e"])[::-1]]:
        if not (radius < s["x"] < nx - radius and radius < s["y"] < ny - radius):
            continue
        others = stars[stars["id"] != s["id"]]
        d = np.hypot(others["x"] - s["x"], others["y"] - s["y"])
        edge = np.abs(d - radius) < 3 * fr["fwhm_px"]
        if np.any(others["flux_e"][edge] > 0.002 * s["flux_e"]):
            continue  # a neighbour on the aperture edge is only partly inside
        d_cr = np.hypot(cr["x"] - s["x"], cr["y"] - s["y"])
        if np.any(np.abs(d_cr - radius) < 3):
            continue  # a cosmic-ray track crossing the edge: its charge is split
        inside = (xx - s["x"]) ** 2 + (yy - s["y"]) ** 2 < radius**2
        # the truth sky, neighbours and cosmic rays are known exactly: subtract them
        measured = (electrons[inside].sum() - fr["sky_e_per_px"] * inside.sum()
                    - others["flux_e"][d < radius].sum() - cr["e"][d_cr < radius].sum())
        variance = (s["flux_e"] + others["flux_e"][d < radius].sum()
                    + inside.sum() * (fr["sky_e_per_px"] + cam["read_noise_e"] ** 2))
        assert abs(measured - s["flux_e"]) < 4.5 * math.sqrt(variance) + 0.001 * s["flux_e"]
        checked += 1
        if checked == 5:
            break
    assert checked >= 3


def test_same_seed_gives_identical_frames_and_other_seed_differs():
    opts = SimOptions(seed=11, small=True, science_per_target=4)
    plans = plan_night(opts)
    job = next(j for j in build_jobs(opts, make_sky(opts), plans)
               if j.plan.kind == "object" and j.band == "i")
    first, _ = render(job)
    again, _ = render(job)
    assert first == again
    other = SimOptions(seed=12, small=True, science_per_target=4)
    job2 = next(j for j in build_jobs(other, make_sky(other), plan_night(other))
                if j.plan.kind == "object" and j.band == "i")
    assert render(job2)[0] != first


def test_log_covers_exactly_the_frames_that_exist_except_the_focus_frame(small_night,
                                                                         small_truth):
    log = next((small_night / "raw").glob("*.log"))
    covered = set()
    for line in log.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        start, end, name, _exp, _ra, _dec = line.split(",")
        covered |= set(range(int(start), int(end) + 1))
    for band in "gri":
        numbers = {int(p.stem.split("_")[-1]) for p in (small_night / "raw" / band).glob("*.fits")}
        assert covered <= numbers
        unlogged = numbers - covered
        assert [f["kind"] for f in small_truth.frames(band=band)
                if f["number"] in unlogged] == ["focus"]


def test_night_has_designed_bad_frames_and_target_variability(small_truth):
    defects = {f["defect"] for f in small_truth.frames("object", "r")}
    assert {"double", "cloud"} <= defects
    for tgt in small_truth.night["targets"]:
        walk = np.array(tgt["walk_r_mag"])
        assert walk.max() - walk.min() == pytest.approx(0.3, abs=1e-6)


def test_true_wcs_puts_stars_where_the_truth_table_says(small_truth):
    fr = small_truth.frames("object", "g")[0]
    w = small_truth.wcs("g", fr["number"])
    fs = small_truth.frame_stars
    sel = fs[(fs["band"] == "g") & (fs["frame"] == fr["number"])]
    stars = small_truth.stars
    idx = {sid: k for k, sid in enumerate(stars["id"])}
    ra = np.array([stars["ra"][idx[s]] for s in sel["id"]])
    dec = np.array([stars["dec"][idx[s]] for s in sel["id"]])
    x, y = w.all_world2pix(ra, dec, 0)
    assert np.max(np.hypot(x - sel["x"], y - sel["y"])) < 1e-6
    # the true scale is within 0.5 % of the configured 0.107"/px x binning
    scale = math.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))) * 3600
    assert scale == pytest.approx(0.107 * SMALL_BINNING, rel=0.005)
    assert CAMERAS["g"].gain_e_per_adu == small_truth.camera("g")["gain_e_per_adu"]


def test_rounded_log_types_oj287_as_the_papers_table_1_does() -> None:
    from photd.simulate import log_lines

    opts = SimOptions(seed=3, small=True, science_per_target=4, log_coords="rounded")
    lines = log_lines(plan_night(opts), opts)
    oj = [ln for ln in lines if ",OJ287," in ln]
    assert len(oj) == 1 and oj[0].endswith(",OJ287,300,08:54:48,+20:06:30")


def test_pointing_log_is_half_an_arcminute_to_a_minute_from_the_target() -> None:
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    from photd.simulate import TARGETS, log_coordinates

    for seed in range(5):
        for tgt in TARGETS:
            ra, dec = log_coordinates(tgt, SimOptions(seed=seed, log_coords="pointing"))
            logged = SkyCoord(ra, dec, unit=(u.hourangle, u.deg))
            true = SkyCoord(tgt.ra_text, tgt.dec_text, unit=(u.hourangle, u.deg))
            assert 29.0 < logged.separation(true).arcsec < 61.0

def test_default_night_is_unchanged_by_the_camera_options():
    # Fingerprints of the default night (seed 7) from before SimOptions grew camera
    # options: the sky and one rendered science frame, byte for byte.
    import hashlib

    opts = SimOptions(seed=7, small=True, science_per_target=8)
    sky = make_sky(opts).table
    assert len(sky) == 1057 and int(sky["in_catalog"].sum()) == 612
    assert float(np.sum(sky["ra"])) == 91013.40669150367
    job = next(j for j in build_jobs(opts, make_sky(opts), plan_night(opts))
               if j.plan.kind == "object" and j.band == "r")
    assert hashlib.sha256(render(job)[0]).hexdigest() == (
        "5ec9a73d605ffbf638548a95ae48b09b284ec6a652c14f3d7ba62ab94bff7a6a")


def test_another_camera_has_its_scale_frame_size_and_catalog_depth():
    opts = SimOptions(seed=3, pixel_scale_arcsec=0.43, frame_shape=(684, 502),
                      catalog_depth_mag=21.9, science_per_target=4)
    assert opts.shape == (684, 502)
    sky = make_sky(opts)
    job = next(j for j in build_jobs(opts, sky, plan_night(opts))
               if j.plan.kind == "object" and j.band == "r" and not j.plan.defect)
    w = WCS(fits.Header(job.truth.wcs))
    scale = math.sqrt(abs(np.linalg.det(w.pixel_scale_matrix))) * 3600
    assert scale == pytest.approx(0.43, rel=1e-6)
    assert job.truth.fwhm_px == pytest.approx(job.truth.fwhm_arcsec / 0.43)
    data = fits.getdata(io.BytesIO(render(job)[0]))
    assert data.shape == (684, 502)
    # ~80 catalog stars on a 3.6' x 4.9' frame (r < 21.9 at the default density)
    cat = sky.table[sky.table["in_catalog"]]
    x, y = w.world_to_pixel_values(np.asarray(cat["ra"]), np.asarray(cat["dec"]))
    on = (x > 0) & (x < 502) & (y > 0) & (y < 684)
    assert 50 < np.count_nonzero(on) < 120
    assert np.max(cat["r"]) < 21.9
    with pytest.raises(ValueError, match="faintest"):
        SimOptions(catalog_depth_mag=23.0)
