"""Benchmark photd's astrometry on a simulated full-size night.

Usage::

    python scripts/bench_astrometry.py NIGHT_DIR [--simulate] [--compare N]

``NIGHT_DIR`` holds a night made by ``photd simulate`` (full size); with
``--simulate`` it is made first (a couple of minutes). Prints: the solve rate
of good frames, the rejection of the designed bad frames with their reasons,
the WCS error against the truth (RMS over a grid, px), the time of
detection + match + fit per frame (one core, catalog already loaded), and a
comparison of sep (what photd uses), photutils and, if installed,
SExtractor (``source-extractor``) on the same frames.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core, as the bar says
# photutils 3 renamed arguments this script uses in the spelling older versions know.
warnings.filterwarnings("ignore", message=".*deprecated.*")

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402
from astropy.wcs import WCS  # noqa: E402
from scipy.spatial import cKDTree  # noqa: E402

from photd.astrometry import BadFit, detect_sources, solve  # noqa: E402
from photd.catalog import read_catalog_file  # noqa: E402
from photd.config import AstrometryConfig, DetectorConfig  # noqa: E402
from photd.simulate import SimOptions, load_truth, simulate_night  # noqa: E402


def guess_wcs(ra_deg: float, dec_deg: float, shape, scale_arcsec: float) -> WCS:
    """The header's WCS: log pointing, configured scale, configured rotation 0."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    s = scale_arcsec / 3600
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    return w


def wcs_error_px(fitted: WCS, true: WCS, shape) -> float:
    yy, xx = np.mgrid[0:shape[0]:25j, 0:shape[1]:25j]
    x, y = fitted.world_to_pixel(true.pixel_to_world(xx.ravel(), yy.ravel()))
    return float(np.sqrt(np.mean((x - xx.ravel()) ** 2 + (y - yy.ravel()) ** 2)))


def centroid_quality(x, y, stars, fwhm_px: float, n: int = 20) -> tuple[int, float]:
    """(true stars found among the n brightest detections, their centroid RMS px)."""
    d, _ = cKDTree(np.column_stack([stars["x"], stars["y"]])).query(
        np.column_stack([x[:n], y[:n]]))
    ok = d < 0.5 * fwhm_px
    return int(ok.sum()), float(np.sqrt(np.mean(d[ok] ** 2))) if ok.any() else math.nan


def photutils_detect(data: np.ndarray, sigma: float):
    from astropy.convolution import convolve
    from photutils.background import Background2D, MedianBackground
    from photutils.segmentation import SourceCatalog, make_2dgaussian_kernel
    from photutils.segmentation import detect_sources as seg_detect

    bkg = Background2D(data, (256, 256), filter_size=(3, 3), bkg_estimator=MedianBackground())
    sub = data - bkg.background
    kernel = make_2dgaussian_kernel(20.0, size=41)
    conv = convolve(sub, kernel)
    seg = seg_detect(conv, sigma * bkg.background_rms_median, npixels=50)
    cat = SourceCatalog(sub, seg, convolved_data=conv)
    order = np.argsort(-np.nan_to_num(cat.segment_flux))
    return np.asarray(cat.xcentroid)[order], np.asarray(cat.ycentroid)[order]


def sextractor_detect(data: np.ndarray, exe: str, fwhm_px: float):
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "f.fits"
        fits.PrimaryHDU(data).writeto(img)
        (Path(tmp) / "p.param").write_text("X_IMAGE\nY_IMAGE\nFLUX_AUTO\n")
        cat = Path(tmp) / "o.cat"
        t0 = time.perf_counter()
        subprocess.run([exe, str(img), "-CATALOG_NAME", str(cat), "-CATALOG_TYPE",
                        "ASCII_HEAD", "-PARAMETERS_NAME", str(Path(tmp) / "p.param"),
                        "-FILTER", "N", "-DETECT_THRESH", "5", "-DETECT_MINAREA", "50",
                        "-BACK_SIZE", "256", "-VERBOSE_TYPE", "QUIET", "-NTHREADS", "1"],
                       check=True, cwd=tmp)
        dt = time.perf_counter() - t0
        t = Table.read(cat, format="ascii.sextractor")
    order = np.argsort(-np.asarray(t["FLUX_AUTO"]))
    return np.asarray(t["X_IMAGE"])[order] - 1, np.asarray(t["Y_IMAGE"])[order] - 1, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("night", type=Path)
    ap.add_argument("--simulate", action="store_true", help="simulate a full-size night first")
    ap.add_argument("--compare", type=int, default=3,
                    help="frames for the detector comparison (default 3)")
    args = ap.parse_args()
    if args.simulate:
        simulate_night(args.night, SimOptions(seed=1, small=False), progress=print)
    truth = load_truth(args.night)
    catalog = read_catalog_file(args.night / "catalog.ecsv")
    cfg = AstrometryConfig()
    binning = truth.night["binning"]
    scale = DetectorConfig().pixel_scale_arcsec * binning
    targets = {t["name"]: (t["ra_deg"], t["dec_deg"]) for t in truth.night["targets"]}

    solved = good = 0
    errors: list[float] = []
    times: list[float] = []
    det_times: list[float] = []
    rejected: list[str] = []
    failed: list[str] = []
    compare: list[tuple[str, np.ndarray, dict]] = []
    for band in "gri":
        bias = truth.pattern("bias", band).astype(np.float32)
        for f in truth.frames("object", band):
            data = fits.getdata(args.night / "raw" / f["path"]).astype(np.float32) - bias
            guess = guess_wcs(*targets[f["target"]], data.shape, scale)
            t0 = time.perf_counter()
            sources, _rms, fwhm = detect_sources(data, detect_sigma=cfg.detect_sigma)
            t1 = time.perf_counter()
            try:
                sol = solve(sources, catalog, guess=guess, shape=data.shape, cfg=cfg,
                            fwhm_px=fwhm)
                outcome = None
            except BadFit as exc:
                sol, outcome = None, exc
            t2 = time.perf_counter()
            name = f"{band} {f['number']:4d}"
            if f["defect"]:
                rejected.append(f"{name} {f['defect']:6s} -> "
                                f"{'SOLVED (not rejected!)' if sol else outcome.reason}")
                continue
            good += 1
            times.append(t2 - t0)
            det_times.append(t1 - t0)
            if sol is None:
                failed.append(f"{name}: {outcome}")
                continue
            solved += 1
            errors.append(wcs_error_px(sol.wcs, truth.wcs(band, f["number"]), data.shape))
            if len(compare) < args.compare and f["number"] % 7 == 0:
                compare.append((name, data, f))
    err = np.array(errors)
    print(f"frames: {binning=} shape={data.shape}")
    print(f"good frames solved: {solved}/{good} = {100 * solved / max(good, 1):.1f} %")
    for line in failed:
        print("  failed:", line)
    print("designed bad frames:")
    for line in rejected:
        print("  ", line)
    print(f"WCS error vs truth (RMS over a 25x25 grid, px): median {np.median(err):.3f}, "
          f"90th pct {np.percentile(err, 90):.3f}, max {err.max():.3f}")
    print(f"time per frame, detection + match + fit: median {np.median(times):.3f} s, "
          f"90th pct {np.percentile(times, 90):.3f} s, max {max(times):.3f} s "
          f"(detection alone: median {np.median(det_times):.3f} s)")

    print("\ndetector comparison (20 brightest detections: true stars found, centroid RMS):")
    exe = shutil.which("source-extractor") or shutil.which("sex")
    for name, data, f in compare:
        stars = truth.frame_stars[(truth.frame_stars["band"] == f["band"])
                                  & (truth.frame_stars["frame"] == f["number"])]
        for label, binning in (("4x4 binned (photd)", None), ("full resolution:   ", 1)):
            t0 = time.perf_counter()
            src, _rms, _fw = detect_sources(data, detect_sigma=5.0, binning=binning)
            t_sep = time.perf_counter() - t0
            usable = src[~src["sharp"]]
            n, rms = centroid_quality(np.asarray(usable["x"]), np.asarray(usable["y"]), stars,
                                      f["fwhm_px"])
            print(f"  {name} sep, {label}: {t_sep:.3f} s, {len(usable)} sources, "
                  f"{n}/20 true, centroid RMS {rms:.3f} px")
        t0 = time.perf_counter()
        x, y = photutils_detect(data, 5.0)
        t_pu = time.perf_counter() - t0
        n, rms = centroid_quality(x, y, stars, f["fwhm_px"])
        print(f"  {name} photutils full res:      {t_pu:.3f} s, {len(x)} sources, "
              f"{n}/20 true, centroid RMS {rms:.3f} px")
        if exe:
            x, y, t_sx = sextractor_detect(data, exe, f["fwhm_px"])
            n, rms = centroid_quality(x, y, stars, f["fwhm_px"])
            print(f"  {name} SExtractor (incl. FITS write/read): {t_sx:.3f} s, {len(x)} "
                  f"sources, {n}/20 true, centroid RMS {rms:.3f} px")
    if not exe:
        print("  source-extractor not installed: skipped")


if __name__ == "__main__":
    main()
