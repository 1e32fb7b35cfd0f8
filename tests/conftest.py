"""Shared fixtures: one small simulated night per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from astropy.table import Table

from photd.simulate import SimOptions, Truth, load_truth, simulate_night

SMALL_OPTS = SimOptions(seed=7, small=True, science_per_target=8)


@pytest.fixture(scope="session")
def small_night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated night (seed 7, 8 science frames per target and band)."""
    out = tmp_path_factory.mktemp("night")
    simulate_night(out, SMALL_OPTS)
    return out


@pytest.fixture(scope="session")
def small_truth(small_night: Path):
    """The truth of :func:`small_night`."""
    return load_truth(small_night)


# --- One measured night for the photometry and light-curve tests ------------
# Twelve science frames per target and band: enough points per light curve for
# a scatter/error ratio to mean something (with 6-7 points its own sampling
# spread is +-30 %), and still about 20 s to simulate and measure.
MEASURED_OPTS = SimOptions(seed=7, small=True, science_per_target=12)


@dataclass(frozen=True)
class MeasuredNight:
    """A simulated night, its truth, its catalog and every science frame measured."""

    root: Path
    truth: Truth
    catalog: Table
    meas: Table  # measure_frame rows + band, frame, target, defect, mjd, airmass, ...
    summaries: dict  # (band, frame number) -> FrameSummary


@pytest.fixture(scope="session")
def measured_night(tmp_path_factory: pytest.TempPathFactory) -> MeasuredNight:
    """Every science frame (but the double exposure, which the astrometry gate
    rejects) calibrated with the TRUE bias and flat and measured with the TRUE
    WCS, so photometry and light-curve tests judge those modules alone."""
    from astropy.io import fits
    from astropy.table import vstack

    from photd.photometry import measure_frame

    root = tmp_path_factory.mktemp("measured_night")
    simulate_night(root, MEASURED_OPTS)
    truth = load_truth(root)
    catalog = Table.read(root / "catalog.ecsv")
    targets = {t["name"]: t for t in truth.night["targets"]}
    tables, summaries = [], {}
    for band in "gri":
        cam = truth.camera(band)
        bias, flat = truth.pattern("bias", band), truth.pattern("flat", band)
        for f in truth.frames("object", band):
            if f["defect"] == "double":
                continue
            raw = fits.getdata(root / "raw" / band / f"xl126{band}_{f['number']:04d}.fits")
            data_e = (raw.astype(float) - bias) / flat * cam["gain_e_per_adu"]
            tgt = targets[f["target"]]
            tab, summ = measure_frame(
                data_e, wcs=truth.wcs(band, f["number"]), stars=catalog,
                target_radec=(tgt["ra_deg"], tgt["dec_deg"]), fwhm_px=f["fwhm_px"],
                gain_e_per_adu=cam["gain_e_per_adu"], rdnoise_e=cam["read_noise_e"],
                exptime_s=f["exptime_s"], mask=raw >= 65535, target_name=f["target"])
            tab["band"] = band
            tab["frame"] = f["number"]
            tab["target"] = f["target"]
            tab["defect"] = f["defect"] or "none"
            tab["mjd"] = f["mjd_mid"]
            tab["bjd_tdb"] = f["mjd_mid"] + 2400000.5  # placeholder; BJD is tested on its own
            tab["airmass"] = f["airmass"]
            tab["fwhm_arcsec"] = f["fwhm_arcsec"]
            tables.append(tab)
            summaries[(band, f["number"])] = summ
    return MeasuredNight(root, truth, catalog, vstack(tables), summaries)
