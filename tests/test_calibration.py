"""Master calibrations and frame reduction, checked against the simulator's truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from photutils.aperture import CircularAnnulus, CircularAperture, aperture_photometry

from photd import calibration as cal
from photd.config import CalibrationConfig, CameraConfig
from photd.simulate import MOFFAT_BETA, SimOptions, camera_patterns, load_truth, simulate_night

OPTS = SimOptions(seed=11, small=True, science_per_target=2)
BAND = "r"
BIAS_NUMBERS = range(1, 11)
FLAT_NUMBERS = range(11, 21)
DARK_NUMBERS = range(21, 24)


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calnight")
    simulate_night(out, OPTS)
    return out


@pytest.fixture(scope="module")
def truth(night: Path):
    return load_truth(night)


def raw_path(night: Path, number: int, band: str = BAND) -> Path:
    return night / "raw" / band / f"xl126{band}_{number:04d}.fits"


def raw(night: Path, number: int, band: str = BAND) -> np.ndarray:
    return fits.getdata(raw_path(night, number, band)).astype(np.float32)


@pytest.fixture(scope="module")
def biases(night: Path) -> list[np.ndarray]:
    return [raw(night, n) for n in BIAS_NUMBERS]


@pytest.fixture(scope="module")
def flats(night: Path) -> list[np.ndarray]:
    return [raw(night, n) for n in FLAT_NUMBERS]


@pytest.fixture(scope="module")
def master_bias(biases: list[np.ndarray]) -> np.ndarray:
    return cal.combine_bias(biases)


@pytest.fixture(scope="module")
def master_flat(flats: list[np.ndarray], master_bias: np.ndarray) -> np.ndarray:
    return cal.combine_flat(flats, master_bias)


# --------------------------------------------------------------------------- masters


def test_master_bias_matches_true_pattern_within_read_noise(master_bias, truth):
    cam = truth.camera(BAND)
    diff = master_bias - truth.pattern("bias", BAND)
    # The bias level wanders by ~0.3 ADU per frame: the master carries the
    # mean of ten such offsets, a constant, and nothing else.
    assert abs(float(np.mean(diff))) < 4 * 0.3 / math.sqrt(len(BIAS_NUMBERS))
    # Per frame noise: read noise plus 1-ADU rounding; averaged over N frames.
    per_frame_adu = math.hypot(cam["read_noise_e"] / cam["gain_e_per_adu"], 1 / math.sqrt(12))
    expected_rms = per_frame_adu / math.sqrt(len(BIAS_NUMBERS))
    assert float(np.std(diff)) == pytest.approx(expected_rms, rel=0.2)


def test_master_flat_recovers_vignetting_and_dust_donut(master_flat, truth):
    true_flat = truth.pattern("flat", BAND)
    assert float(np.mean(master_flat)) == pytest.approx(1.0, abs=1e-5)
    ratio = master_flat / true_flat
    assert float(np.std(ratio)) < 0.005
    # Large-scale structure (vignetting 7 %, dust donut 4 %) is recovered far
    # better than per pixel: compare 8x8 block means, where photon noise averages out.
    ny, nx = (s // 8 * 8 for s in ratio.shape)
    blocks = ratio[:ny, :nx].reshape(ny // 8, 8, nx // 8, 8).mean(axis=(1, 3))
    assert float(np.std(blocks)) < 0.001


def test_flat_with_star_is_clipped_from_master(flats, master_bias, master_flat, truth):
    bias = truth.pattern("bias", BAND)
    true_flat = truth.pattern("flat", BAND)
    n_star_px = 0
    for frame in flats:
        reduced = frame - bias
        level = sigma_clipped_stats(reduced, sigma=3)[1]
        excess = reduced / level / true_flat - 1.0
        noise = sigma_clipped_stats(excess, sigma=3)[2]
        # Pixels far above the flat in this one frame: stars (and cosmic rays).
        stars = excess > 10 * noise
        if not stars.any():
            continue
        n_star_px += int(stars.sum())
        unclipped_error = float(np.mean(excess[stars])) / len(flats)
        master_error = float(np.mean((master_flat / true_flat - 1.0)[stars]))
        # A plain average would print the star at 1/N of its height; the clipped
        # combine leaves no more than noise there.
        assert unclipped_error > 0.005
        assert abs(master_error) < min(0.002, unclipped_error / 3)
        assert float(np.max(master_flat[stars] / true_flat[stars])) < 1.01
    assert n_star_px > 20  # the simulator did put stars into the flats


def test_build_master_from_files_rejects_light_leak_and_matches_truth(
    night: Path, truth, tmp_path: Path
):
    leak = fits.getdata(raw_path(night, 3)).astype(np.float32) + 500.0
    leak_path = tmp_path / "xl126r_0099.fits"
    fits.PrimaryHDU(leak).writeto(leak_path)
    paths = [raw_path(night, n) for n in BIAS_NUMBERS] + [leak_path]
    # A tiny memory limit forces many strips: the strip reader must still
    # assemble the frame correctly.
    cfg = CalibrationConfig(memory_limit_mb=0.5)
    result = cal.build_master("bias", paths, cfg=cfg, cam=CameraConfig(band=BAND))
    assert result.inputs == [str(p) for p in paths[:-1]]
    assert result.rejected[str(leak_path)].reason == "outlier_level"
    cam = truth.camera(BAND)
    diff = result.data - truth.pattern("bias", BAND)
    expected_rms = cam["read_noise_e"] / cam["gain_e_per_adu"] / math.sqrt(10)
    assert float(np.std(diff)) == pytest.approx(expected_rms, rel=0.2)

    flat = cal.build_master(
        "flat",
        [raw_path(night, n) for n in FLAT_NUMBERS],
        cfg=cfg,
        cam=CameraConfig(band=BAND),
        master_bias=result.data,
    )
    assert len(flat.inputs) == len(FLAT_NUMBERS) and not flat.rejected
    assert float(np.std(flat.data / truth.pattern("flat", BAND))) < 0.005


def test_master_written_atomically_lists_inputs_and_version(tmp_path: Path):
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    inputs = [f"/data/raw/r/xl126r_{n:04d}.fits" for n in (1, 2, 3)]
    dest = tmp_path / "masters" / "bias_r_v2.fits"
    cal.write_master(
        dest,
        data,
        kind="bias",
        band="r",
        night="2016-11-01",
        version=2,
        inputs=inputs,
        extra={"GAIN": (1.62, "[e-/ADU]")},
    )
    back, hdr = cal.read_master(dest)
    np.testing.assert_array_equal(back, data)
    assert hdr["MVERSION"] == 2 and hdr["MASTER"] == "bias" and hdr["NINPUTS"] == 3
    assert [hdr[f"INPUT{k:03d}"] for k in (1, 2, 3)] == [Path(p).name for p in inputs]
    assert any("xl126r_0003.fits" in str(h) for h in hdr["HISTORY"])
    assert hdr["GAIN"] == 1.62
    assert sorted(p.name for p in dest.parent.iterdir()) == ["bias_r_v2.fits"]


def test_master_dark_recovers_hot_pixels(night: Path, master_bias, truth):
    darks = [raw(night, n) for n in DARK_NUMBERS]
    exptimes = [truth.frame(BAND, n)["exptime_s"] for n in DARK_NUMBERS]
    dark = cal.combine_dark(darks, master_bias, exptimes)
    gain = truth.camera(BAND)["gain_e_per_adu"]
    true_dark = camera_patterns(OPTS.seed, BAND, OPTS.binning)["dark"]
    hot = true_dark > 1.0
    measured = dark[hot] * gain
    # Median of three 300-s darks: Poisson on >= 600 e- plus read noise.
    assert np.all(np.abs(measured / true_dark[hot] - 1.0) < 0.25)
    # 0.01 e-/px/s: negligible at the paper's 0.1 threshold, not at 0.001.
    assert not cal.dark_is_significant(
        dark, gain_e_per_adu=gain, cam=CameraConfig(dark_current_e_per_s=0.1)
    )
    assert cal.dark_is_significant(
        dark, gain_e_per_adu=gain, cam=CameraConfig(dark_current_e_per_s=0.001)
    )


def test_dark_level_from_raw_frames_matches_true_dark_current(night: Path, master_bias, truth):
    # The daemon drops darks from this cheap estimate without combining a master.
    paths = [raw_path(night, n) for n in DARK_NUMBERS]
    exptimes = [truth.frame(BAND, n)["exptime_s"] for n in DARK_NUMBERS]
    gain = truth.camera(BAND)["gain_e_per_adu"]
    rate_e = cal.dark_level_adu_per_s(paths, master_bias, exptimes, CameraConfig()) * gain
    true_median = float(np.median(camera_patterns(OPTS.seed, BAND, OPTS.binning)["dark"]))
    # 300-s darks: 3 e- of dark current under ~10 e- read noise per pixel; the
    # clipped median over ~50k pixels pins it to a few 0.001 e-/s.
    assert abs(rate_e - true_median) < 0.005
    assert rate_e < 0.1 / 5  # far below the paper's threshold: no master is built


# --------------------------------------------------------------------------- gain


def test_gain_and_read_noise_from_two_biases_and_two_flats(biases, flats, truth):
    cam = truth.camera(BAND)
    gain, read_noise = cal.gain_readnoise(biases[0], biases[1], flats[0], flats[1])
    assert gain == pytest.approx(cam["gain_e_per_adu"], rel=0.03)
    assert read_noise == pytest.approx(cam["read_noise_e"], rel=0.03)


@pytest.mark.parametrize("band", ["g", "i"])
def test_gain_and_read_noise_over_pairs_every_camera(night: Path, truth, band: str):
    cam = truth.camera(band)
    b = [raw(night, n, band) for n in BIAS_NUMBERS]
    f = [raw(night, n, band) for n in FLAT_NUMBERS]
    gain, read_noise = cal.gain_readnoise_pairs(b, f)
    assert gain == pytest.approx(cam["gain_e_per_adu"], rel=0.03)
    assert read_noise == pytest.approx(cam["read_noise_e"], rel=0.03)


# --------------------------------------------------------------------------- rejection


@pytest.fixture(scope="module")
def checker(biases, master_bias):
    cfg = CalibrationConfig()
    cam = CameraConfig(band=BAND)
    shape = master_bias.shape
    siblings = float(np.median([np.median(b) for b in biases]))
    bias_level = float(np.median(master_bias))

    def check(kind: str, data: np.ndarray):
        return cal.check_calibration_frame(
            kind,
            data,
            expected_shape=shape,
            cfg=cfg,
            cam=cam,
            siblings_median=siblings if kind == "bias" else None,
            bias_level_adu=bias_level,
        )

    return check


def test_good_calibration_frames_are_accepted(checker, biases, flats):
    assert all(checker("bias", b) is None for b in biases)
    assert all(checker("flat", f) is None for f in flats)


def test_frame_with_wrong_shape_is_rejected(checker, biases):
    why = checker("bias", biases[0][:-5, :])
    assert why.reason == "wrong_shape" and "frame is" in why.message


def test_too_faint_flat_is_rejected(checker, flats, master_bias):
    faint = master_bias + (flats[0] - master_bias) * 0.1  # ~3000 ADU above bias
    assert checker("flat", faint).reason == "flat_too_faint"


def test_saturated_flat_is_rejected(checker, flats, master_bias):
    over = np.minimum(master_bias + (flats[0] - master_bias) * 3.0, 65535.0)
    assert checker("flat", over).reason == "flat_saturated"


def test_light_leak_bias_is_rejected(checker, biases):
    why = checker("bias", biases[4] + 500.0)
    assert why.reason == "outlier_level"
    assert "+500" in why.message or "+499" in why.message or "+50" in why.message


# --------------------------------------------------------------------------- reduction


def test_saturated_pixels_are_masked_with_their_neighbours():
    data = np.full((7, 7), 1000.0, np.float32)
    data[3, 3] = 65535.0
    out, mask = cal.calibrate(
        data,
        master_bias=np.full((7, 7), 1000.0, np.float32),
        exptime_s=10.0,
        saturation_adu=65000.0,
    )
    assert mask.sum() == 9 and mask[2:5, 2:5].all()
    assert out.dtype == np.float32 and out[0, 0] == 0.0


def test_overscan_subtracted_per_row_and_trimmed():
    data = np.zeros((4, 6), np.float32)
    data[:, :4] = 100.0
    data[:, 4:] = np.arange(4)[:, None] * 10.0  # a row-dependent overscan level
    data[:, :4] += np.arange(4)[:, None] * 10.0
    cam = CameraConfig(overscan="[5:6,1:4]", trim="[1:4,1:4]")
    out = cal.apply_overscan_trim(data, cam)
    assert out.shape == (4, 4)
    np.testing.assert_allclose(out, 100.0)


def test_calibrated_star_fluxes_match_truth(night: Path, truth, master_bias, master_flat):
    checked = 0
    for frame in truth.frames("object", BAND):
        checked += _check_star_fluxes(night, truth, frame, master_bias, master_flat)
    assert checked >= 5


def _check_star_fluxes(night, truth, frame, master_bias, master_flat) -> int:
    """Aperture fluxes of bright isolated stars on one frame vs truth; returns how many."""
    cam = truth.camera(BAND)
    gain = cam["gain_e_per_adu"]
    number = frame["number"]
    data, mask = cal.calibrate(
        raw(night, number),
        master_bias=master_bias,
        master_flat=master_flat,
        exptime_s=frame["exptime_s"],
        saturation_adu=65000.0,
    )
    fwhm = frame["fwhm_px"]
    r_ap, r_in, r_out = 5 * fwhm, 5.5 * fwhm, 7.5 * fwhm
    stars = truth.frame_stars[
        (truth.frame_stars["band"] == BAND) & (truth.frame_stars["frame"] == number)
    ]
    # Cosmic rays are part of the truth too: a star with one on its aperture
    # or annulus is not a fair comparison.
    cosmics = Table.read(night / "truth" / "cosmics.ecsv")
    cosmics = cosmics[(cosmics["band"] == BAND) & (cosmics["frame"] == number)]
    ny, nx = data.shape
    chosen = []
    for s in stars:
        if s["flux_e"] < 5e4:
            continue
        if not (r_out < s["x"] < nx - 1 - r_out and r_out < s["y"] < ny - 1 - r_out):
            continue
        d = np.hypot(stars["x"] - s["x"], stars["y"] - s["y"])
        near = (d > 0) & (d < r_out + 3 * fwhm) & (stars["flux_e"] > 1e-3 * s["flux_e"])
        hit = np.hypot(cosmics["x"] - s["x"], cosmics["y"] - s["y"]) < r_out + 2
        if not near.any() and not hit.any():
            chosen.append(s)
    if not chosen:
        return 0
    xy = [(s["x"], s["y"]) for s in chosen]
    aper = CircularAperture(xy, r=r_ap)
    annulus = CircularAnnulus(xy, r_in=r_in, r_out=r_out)
    phot = aperture_photometry(data, aper, mask=mask)
    # Moffat light beyond r: (1 + r^2/alpha^2)^(1 - beta); the simulator's PSF.
    alpha = fwhm / (2 * math.sqrt(2 ** (1 / MOFFAT_BETA) - 1))
    enclosed = 1 - (1 + (r_ap / alpha) ** 2) ** (1 - MOFFAT_BETA)
    rn_adu = cam["read_noise_e"] / gain
    for k, s in enumerate(chosen):
        ann = annulus[k].to_mask(method="center").get_values(data)
        _, sky, sky_std = sigma_clipped_stats(ann, sigma=3)
        area = aper.area
        flux_e = (float(phot["aperture_sum"][k]) - sky * area) * gain / enclosed
        sky_e = sky * gain
        sigma_e = math.sqrt(
            s["flux_e"]
            + area * (sky_e + (rn_adu * gain) ** 2)
            + area**2 * (sky_std * gain) ** 2 / len(ann)
        )
        assert abs(flux_e - s["flux_e"]) < 4 * sigma_e + 0.003 * s["flux_e"], (
            f"frame {number} star {s['id']}: {flux_e:.0f} e- vs true {s['flux_e']:.0f} "
            f"+- {sigma_e:.0f}"
        )
    return len(chosen)
