"""Solve rate and worst accepted WCS error of photd's astrometry on simulated nights.

Usage::

    python scripts/solve_rate.py WORKDIR [--camera e2v-small|e2v-full|sparse]
                                 [--seeds 1 2 3] [--frames 20]

Simulates one night per seed (``--frames`` science frames per target and band)
with the chosen camera, then detects and solves every science frame as the
pipeline does: the guess WCS is the log's target position with the configured
(nominal) pixel scale and no rotation, the catalog is the configured cone
around it. Prints per night: good frames solved, the reasons of the failures,
the designed bad frames and what they got, and the worst error against the
simulator's true WCS of any accepted frame (max over a grid of the frame, px).

Cameras: ``e2v-small`` is the 1.26 m binned 5 x 5 (0.535"/px, 507 x 671 px),
``e2v-full`` unbinned (0.107"/px, 2536 x 3358; slow), ``sparse`` a 0.43"/px
camera with a 3.6' x 4.9' field and ~80 catalog stars per frame.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from photd.astrometry import BadFit, detect_sources, solve  # noqa: E402
from photd.catalog import cone  # noqa: E402
from photd.config import AstrometryConfig, CatalogConfig  # noqa: E402
from photd.simulate import SimOptions, load_truth, simulate_night  # noqa: E402

#: camera name -> (simulator options, the pixel scale a user would configure, unbinned)
CAMERAS = {
    "e2v-small": (dict(small=True), 0.107),
    "e2v-full": (dict(small=False), 0.107),
    "sparse": (dict(small=False, pixel_scale_arcsec=0.43, frame_shape=(684, 502),
                    catalog_depth_mag=21.9), 0.43),
}


def guess_wcs(ra_deg: float, dec_deg: float, shape, scale_arcsec: float) -> WCS:
    """The rebuilt header's WCS: log position, configured scale, rotation 0."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(shape[1] + 1) / 2, (shape[0] + 1) / 2]
    s = scale_arcsec / 3600
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    return w


def max_error_px(fitted: WCS, true: WCS, shape) -> float:
    """Largest pixel distance true -> sky -> fitted over a 25 x 25 grid of the frame."""
    yy, xx = np.mgrid[0:shape[0] - 1:25j, 0:shape[1] - 1:25j]
    x, y = fitted.world_to_pixel(true.pixel_to_world(xx.ravel(), yy.ravel()))
    return float(np.max(np.hypot(x - xx.ravel(), y - yy.ravel())))


def run_night(root: Path, nominal_scale: float, cfg: AstrometryConfig,
              cone_arcmin: float) -> dict:
    truth = load_truth(root)
    catalog = Table.read(root / "catalog.ecsv")
    binning = truth.night["binning"]
    targets = {t["name"]: (t["ra_deg"], t["dec_deg"]) for t in truth.night["targets"]}
    cones = {n: cone(catalog, ra, dec, cone_arcmin) for n, (ra, dec) in targets.items()}
    out = {"good": 0, "solved": 0, "fail": Counter(), "bad": [], "worst": 0.0,
           "times": [], "n_cat": [], "examples": []}
    for band in "gri":
        bias = truth.pattern("bias", band).astype(np.float32)
        for f in truth.frames("object", band):
            raw = fits.getdata(root / "raw" / f["path"])
            data = raw.astype(np.float32) - bias
            mask = raw >= 65535
            guess = guess_wcs(*targets[f["target"]], data.shape, nominal_scale * binning)
            t0 = time.perf_counter()
            sources, _rms, fwhm = detect_sources(data, mask, detect_sigma=cfg.detect_sigma,
                                                 saturation=65000.0)
            try:
                sol = solve(sources, cones[f["target"]], guess=guess, shape=data.shape,
                            cfg=cfg, fwhm_px=fwhm)
                exc = None
            except BadFit as e:
                sol, exc = None, e
            dt = time.perf_counter() - t0
            if f["defect"]:
                out["bad"].append((band, f["number"], f["defect"],
                                   exc.reason if exc else "ACCEPTED"))
                continue
            out["good"] += 1
            out["times"].append(dt)
            true = truth.wcs(band, f["number"])
            xs, ys = true.world_to_pixel_values(np.asarray(catalog["ra"]),
                                                np.asarray(catalog["dec"]))
            out["n_cat"].append(int(np.count_nonzero((xs > 0) & (xs < data.shape[1])
                                                     & (ys > 0) & (ys < data.shape[0]))))
            if exc is not None:
                out["fail"][exc.reason] += 1
                if len(out["examples"]) < 4:
                    out["examples"].append(f"{band} {f['number']}: {exc}")
                continue
            out["solved"] += 1
            err = max_error_px(sol.wcs, true, data.shape)
            if err > 0.5 and len(out["examples"]) < 8:
                out["examples"].append(f"{band} {f['number']}: accepted with error {err:.2f} px "
                                       f"({sol.n_matches} matches, rms {sol.rms_arcsec:.3f}\")")
            out["worst"] = max(out["worst"], err)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--camera", choices=sorted(CAMERAS), default="sparse")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--frames", type=int, default=20,
                    help="science frames per target and band (default 20)")
    args = ap.parse_args()
    sim, nominal = CAMERAS[args.camera]
    cfg = AstrometryConfig()
    cone_arcmin = CatalogConfig().radius_arcmin
    total = Counter()
    for seed in args.seeds:
        tag = "-".join(f"{k}{v}" for k, v in sorted(sim.items())).replace(" ", "")
        root = args.workdir / f"{args.camera}-{seed}-{args.frames}-{tag}"
        if not (root / "truth" / "night.json").exists():
            simulate_night(root, SimOptions(seed=seed, science_per_target=args.frames, **sim))
        r = run_night(root, nominal, cfg, cone_arcmin)
        bad_ok = sum(b[3] != "ACCEPTED" for b in r["bad"])
        total.update(good=r["good"], solved=r["solved"], bad=len(r["bad"]), bad_ok=bad_ok)
        print(f"{args.camera} seed {seed}: good solved {r['solved']}/{r['good']} "
              f"({100 * r['solved'] / max(r['good'], 1):.1f} %), failures {dict(r['fail'])}, "
              f"bad frames rejected {bad_ok}/{len(r['bad'])} "
              f"{sorted({(b[2], b[3]) for b in r['bad']})}, worst accepted error "
              f"{r['worst']:.3f} px, catalog stars in frame median {np.median(r['n_cat']):.0f} "
              f"(min {min(r['n_cat'])}), detect+solve median {np.median(r['times']):.3f} s")
        for line in r["examples"]:
            print("   ", line)
    print(f"TOTAL {args.camera}: {total['solved']}/{total['good']} good frames solved "
          f"({100 * total['solved'] / max(total['good'], 1):.1f} %), designed bad frames "
          f"rejected {total['bad_ok']}/{total['bad']}")


if __name__ == "__main__":
    main()
