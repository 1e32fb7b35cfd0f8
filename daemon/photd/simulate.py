"""The night simulator: raw frames of the 1.26 m three-channel imager, and their truth.

This module is the independent truth that every numeric test checks against.
It deliberately imports none of photd's measuring modules (calibration,
astrometry, photometry, lightcurve) nor its configuration: the instrument,
the site and the sky are defined here, and it uses only numpy and astropy.

What a simulated night contains (``photd simulate OUTDIR``)::

    OUTDIR/
      raw/                      what the cameras and the observer write
        g/xl126g_0001.fits      one folder per camera (``layout="folders"``), or
        xl126_g_0001.fits       the band in the file name (``layout="names"``)
        20161101.log            the observing log (paper Table 1, CRLF)
      catalog.ecsv              the reference catalog (ra, dec, g, r, i, G, errors, pm)
      truth/
        night.json              instrument, targets and every frame (true WCS, seeing,
                                sky, airmass, defects)
        stars.ecsv              every star: true position and true g, r, i
        frame_stars.ecsv        per frame and star: pixel position, flux (e-), true mag
        cosmics.ecsv            per frame: every cosmic-ray hit (pixel, e-)
        bias_<b>.fits           true bias pattern of each camera (ADU)
        flat_<b>.fits           true flat-field response of each camera (mean 1)
        dark_<b>.fits           true dark current of each camera (e-/s, hot pixels)

Units: raw frames are 16-bit ADU (BITPIX=16, BZERO=32768). ``flux_e`` in the
truth is the expected number of photo-electrons a star deposits in a frame
(after atmosphere, before the flat field), so a bias-subtracted, flat-fielded
frame times the gain holds ``flux_e`` electrons per star.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.utils import iers
from astropy.wcs import WCS

# Run offline: the bundled IERS tables cover the simulated dates.
iers.conf.auto_download = False

BANDS = ("g", "r", "i")

# ---------------------------------------------------------------------------
# The instrument, site and sky: the truth (do not import these in measuring code)
# ---------------------------------------------------------------------------
FULL_SHAPE = (3358, 2536)  # (ny, nx) unbinned pixels
SMALL_BINNING = 5  # --small: on-chip 5x5 binning, same sky and optics: 507 x 671 px
SITE = EarthLocation.from_geodetic(
    lon=117.577222 * u.deg, lat=40.395833 * u.deg, height=960.0 * u.m
)


@dataclass(frozen=True)
class Camera:
    """True properties of one camera (one band)."""

    band: str
    gain_e_per_adu: float
    read_noise_e: float
    bias_level_adu: float
    pixel_scale_arcsec: float  # unbinned
    rotation_deg: float  # of +y from north through east, fixed mounting error
    offset_arcsec: tuple[float, float]  # (east, north) boresight offset from the mount
    zeropoint_mag: float  # magnitude giving 1 e-/s above the atmosphere
    extinction_mag_per_airmass: float
    colour_term: float  # instrumental - standard = colour_term * colour
    colour: tuple[str, str]  # the colour index the term multiplies
    sky_mag_per_arcsec2: float  # dark sky at zenith
    seeing_factor: float  # seeing relative to r (shorter wavelengths see worse)
    dark_e_per_s: float = 0.01  # the paper: below 0.1 e-/px/s, negligible


CAMERAS = {
    "g": Camera("g", 1.58, 7.8, 1002.0, 0.1071, 0.35, (2.0, -1.5), 24.0, 0.25, 0.05,
                ("g", "r"), 21.3, 1.06),
    "r": Camera("r", 1.62, 8.1, 985.0, 0.1068, -0.20, (0.0, 0.0), 24.2, 0.15, -0.03,
                ("g", "r"), 20.6, 1.00),
    "i": Camera("i", 1.66, 8.4, 1013.0, 0.1073, 0.15, (-1.5, 2.5), 23.8, 0.10, 0.04,
                ("r", "i"), 19.9, 0.96),
}

MOFFAT_BETA = 3.0
SATURATION_ADU = 65535
COSMIC_RATE_PER_CM2_MIN = 2.0
PIXEL_SIZE_CM = 13.5e-4  # 13.5 micron pixels
READOUT_S = 20.0


@dataclass(frozen=True)
class Target:
    """A science target: its true position and mean magnitudes."""

    name: str
    ra_text: str  # as the observer types it into the log (hours)
    dec_text: str
    r_mag: float
    g_minus_r: float
    r_minus_i: float


TARGETS = (
    Target("PKS0235+164", "02:38:38.9301", "+16:36:59.275", 16.6, 0.55, 0.40),
    Target("OJ287", "08:54:48.87", "+20:06:30.6", 14.9, 0.45, 0.35),
)


@dataclass(frozen=True)
class SimOptions:
    """What night to simulate."""

    seed: int = 1
    small: bool = False
    science_per_target: int = 30  # per band: 2 targets x 30 = 60 science frames a band
    layout: str = "folders"  # "folders" (raw/g/...) or "names" (raw/xl126_g_0001.fits)
    log: str = "end"  # "end": log written after the last frame; "start"; "growing"
    night: str = "2016-11-01"
    n_bias: int = 10
    n_flat: int = 10
    n_dark: int = 3
    flats: str = "dusk"  # "dusk" (before the science frames) or "dawn" (after them)
    workers: int = 0  # 0 = number of cores (non-arrival mode)
    # How the observer types the targets' coordinates into the log: "exact";
    # "rounded" (whole seconds of RA and arcsec of Dec cut off, as the paper's
    # Table 1 gives OJ 287: 08:54:48 +20:06:30, 12" from it); "pointing" (the
    # field centre the telescope was sent to, 30-60" from the target).
    log_coords: str = "exact"
    # How the reference catalog lists the targets: "name" (a row whose id is
    # the log's name, as a chart sequence does); "spaced" (the name spelled
    # as SIMBAD does, "OJ 287"); "none" (not listed, as in a star catalog).
    catalog_targets: str = "name"
    # Another camera and other fields (the defaults are the 1.26 m's E2V cameras on
    # high-latitude fields): the unbinned pixel scale of the middle (r) camera, the
    # others keep their small differences from it; the unbinned frame size (ny, nx);
    # field stars per arcmin^2 brighter than r = 20 (counts rise 0.25 dex per mag);
    # the faintest r in the reference catalog (at most 22, the faintest star made).
    pixel_scale_arcsec: float | None = None  # None = 0.1068"/px (r camera)
    frame_shape: tuple[int, int] | None = None  # None = FULL_SHAPE
    star_density: float = 1.5
    catalog_depth_mag: float = 21.0

    def __post_init__(self) -> None:
        if not self.catalog_depth_mag <= FAINTEST_MAG:
            raise ValueError(f"catalog_depth_mag {self.catalog_depth_mag} is fainter than the "
                             f"faintest simulated star (r = {FAINTEST_MAG})")
        if self.frame_shape is not None:
            object.__setattr__(self, "frame_shape", tuple(int(v) for v in self.frame_shape))

    @property
    def binning(self) -> int:
        return SMALL_BINNING if self.small else 1

    @property
    def shape(self) -> tuple[int, int]:
        full = FULL_SHAPE if self.frame_shape is None else self.frame_shape
        return (full[0] // self.binning, full[1] // self.binning)

    @property
    def sky_radius_arcmin(self) -> float:
        """Radius of the simulated sky around each target: the frame plus pointing errors."""
        cams = sim_cameras(self)
        scale = max(c.pixel_scale_arcsec for c in cams.values()) * self.binning
        half_diagonal = 0.5 * math.hypot(*self.shape) * scale / 60.0
        return max(6.0, half_diagonal + 2.0)


FAINTEST_MAG = 22.0  # faintest field star simulated (r)


def sim_cameras(opts: SimOptions) -> dict[str, Camera]:
    """The cameras of a night: :data:`CAMERAS`, rescaled to ``opts.pixel_scale_arcsec``."""
    if opts.pixel_scale_arcsec is None:
        return CAMERAS
    f = opts.pixel_scale_arcsec / CAMERAS["r"].pixel_scale_arcsec
    return {b: replace(c, pixel_scale_arcsec=c.pixel_scale_arcsec * f) for b, c in CAMERAS.items()}


@dataclass
class FramePlan:
    """One exposure of the night (the same number on all three cameras)."""

    number: int
    kind: str  # bias, flat, dark, object, focus
    exptime_s: float
    start: str  # ISO UTC
    target: str = ""
    in_log: bool = True
    defect: str = ""  # "", "double", "cloud"
    camera_exptime_s: float | None = None  # what the camera writes (a camera bug)
    flat_level_adu: float = 0.0


@dataclass
class FrameTruth:
    """What a frame really is (one camera)."""

    path: str
    band: str
    number: int
    kind: str
    target: str
    in_log: bool
    defect: str
    date_obs: str
    mjd_start: float
    mjd_mid: float
    exptime_s: float
    camera_exptime_s: float
    airmass: float | None = None
    fwhm_arcsec: float | None = None
    fwhm_px: float | None = None
    sky_e_per_px: float | None = None
    sky_adu: float | None = None
    transparency: float | None = None
    pointing_ra_deg: float | None = None
    pointing_dec_deg: float | None = None
    rotation_deg: float | None = None
    wcs: dict = field(default_factory=dict)
    n_cosmics: int = 0


# ---------------------------------------------------------------------------
# The night plan
# ---------------------------------------------------------------------------

def _iso(t: Time) -> str:
    return t.utc.isot[:23]


def plan_night(opts: SimOptions) -> list[FramePlan]:
    """Frame numbers, kinds and start times of the whole night.

    Calibrations first (biases, dusk sky flats, darks), an unlogged focus
    frame, then each target in turn; with ``flats="dawn"`` the sky flats come
    last, as they often do. One frame of the first target is a
    double exposure and one of the second is clouded out.
    """
    night0 = Time(f"{opts.night}T09:20:00", scale="utc")
    plans: list[FramePlan] = []
    n = 1
    t = night0
    for _ in range(opts.n_bias):
        plans.append(FramePlan(n, "bias", 0.0, _iso(t)))
        n += 1
        t += 25 * u.s

    def flats(n: int, start: str, dawn: bool) -> int:
        t = Time(start, scale="utc")
        for k in range(opts.n_flat):
            # Dusk fades: the observer lengthens exposures, levels fall 30k -> 15k ADU;
            # at dawn the sky brightens and it goes the other way.
            frac = k / max(opts.n_flat - 1, 1)
            level = 15000.0 + 15000.0 * frac if dawn else 30000.0 - 15000.0 * frac
            exptime = 2.0 + 1.2 * (opts.n_flat - 1 - k if dawn else k)
            plans.append(FramePlan(n, "flat", round(exptime, 1), _iso(t), flat_level_adu=level))
            n += 1
            t += 60 * u.s
        return n

    if opts.flats == "dusk":
        n = flats(n, f"{opts.night}T09:40:00", dawn=False)
    t = Time(f"{opts.night}T10:00:00", scale="utc")
    for _ in range(opts.n_dark):
        plans.append(FramePlan(n, "dark", 300.0, _iso(t)))
        n += 1
        t += (300 + READOUT_S) * u.s
    t = Time(f"{opts.night}T11:50:00", scale="utc")
    plans.append(FramePlan(n, "focus", 10.0, _iso(t), target="focus", in_log=False))
    n += 1
    starts = {"PKS0235+164": f"{opts.night}T12:00:00", "OJ287": f"{opts.night}T17:20:00"}
    ns = opts.science_per_target
    for tgt in TARGETS:
        t = Time(starts[tgt.name], scale="utc")
        for k in range(ns):
            plan = FramePlan(n, "object", 300.0, _iso(t), target=tgt.name)
            if tgt is TARGETS[0] and ns >= 4 and k == ns // 2 + 1:
                plan.defect = "double"
            if tgt is TARGETS[1] and ns >= 4 and k == ns // 2:
                plan.defect = "cloud"
            if tgt is TARGETS[1] and ns >= 4 and k == 2:
                plan.camera_exptime_s = 0.0  # a camera that forgot its exposure time
            plans.append(plan)
            n += 1
            t += (300 + READOUT_S) * u.s
    if opts.flats == "dawn":
        n = flats(n, f"{opts.night}T21:30:00", dawn=True)
    return plans


def log_coordinates(tgt: Target, opts: SimOptions) -> tuple[str, str]:
    """A target's RA and Dec as the observer types them (``opts.log_coords``)."""
    if opts.log_coords == "exact":
        return tgt.ra_text, tgt.dec_text
    if opts.log_coords == "rounded":  # digits after the last colon cut off, not rounded
        return tgt.ra_text.split(".")[0], tgt.dec_text.split(".")[0]
    if opts.log_coords == "pointing":
        rng = _rng(opts, 9, TARGETS.index(tgt))
        dist, angle = rng.uniform(30.0, 60.0), rng.uniform(0, 2 * math.pi)
        c = SkyCoord(*_target_deg(tgt), unit="deg").spherical_offsets_by(
            dist * math.cos(angle) * u.arcsec, dist * math.sin(angle) * u.arcsec)
        return (c.ra.to_string(unit=u.hourangle, sep=":", precision=1, pad=True),
                c.dec.to_string(sep=":", precision=0, alwayssign=True, pad=True))
    raise ValueError(f"log_coords must be exact, rounded or pointing, not {opts.log_coords!r}")


def log_lines(plans: list[FramePlan], opts: SimOptions | None = None) -> list[str]:
    """The observing log (paper Table 1) that the observer writes for ``plans``."""
    opts = opts or SimOptions()
    lines: list[str] = []
    groups: list[list[FramePlan]] = []
    for p in plans:
        if not p.in_log:
            continue
        if groups and groups[-1][-1].kind == p.kind and groups[-1][-1].target == p.target \
                and groups[-1][-1].number == p.number - 1:
            groups[-1].append(p)
        else:
            groups.append([p])
    targets = {t.name: t for t in TARGETS}
    for g in groups:
        first, last = g[0], g[-1]
        if first.kind == "object":
            tgt = targets[first.target]
            ra_text, dec_text = log_coordinates(tgt, opts)
            lines.append(f"{first.number},{last.number},{tgt.name},{first.exptime_s:g},"
                         f"{ra_text},{dec_text}")
        else:
            name = {"bias": "bias", "flat": "sky flat", "dark": "dark"}[first.kind]
            lines.append(f"{first.number},{last.number},{name},{first.exptime_s:g},,")
    return lines


# ---------------------------------------------------------------------------
# The sky: stars, the variable target, a variable field star
# ---------------------------------------------------------------------------

@dataclass
class Sky:
    """Every star of the night (both fields) with true magnitudes."""

    table: Table  # id, ra, dec, g, r, i, G, in_catalog, kind
    target_walk: dict[str, np.ndarray]  # target name -> r-band offset per science frame
    variable_star: dict[str, str]  # target name -> id of the planted variable field star


def _rng(opts: SimOptions, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(opts.seed, spawn_key=key))


def make_sky(opts: SimOptions) -> Sky:
    """Field stars around each target, high-latitude counts, down to r = 22."""
    rng = _rng(opts, 1)
    rows = []
    walks: dict[str, np.ndarray] = {}
    variables: dict[str, str] = {}
    for ti, tgt in enumerate(TARGETS):
        c = SkyCoord(tgt.ra_text, tgt.dec_text, unit=(u.hourangle, u.deg))
        radius_arcmin = opts.sky_radius_arcmin
        area = math.pi * radius_arcmin**2
        # Cumulative counts N(<m) = density per arcmin^2 * 10**(0.25 (m - 20)), 12 < r < 22
        # (density 1.5 by default).
        n_total = rng.poisson(opts.star_density * 10 ** (0.25 * (FAINTEST_MAG - 20)) * area)
        u01 = rng.uniform(size=n_total)
        lo, hi = 10 ** (0.25 * (12 - 20)), 10 ** (0.25 * (FAINTEST_MAG - 20))
        rmag = 20 + 4 * np.log10(lo + u01 * (hi - lo))
        rr = radius_arcmin * np.sqrt(rng.uniform(size=n_total))
        th = rng.uniform(0, 2 * np.pi, size=n_total)
        dx, dy = rr * np.cos(th), rr * np.sin(th)
        dec = c.dec.deg + dy / 60
        ra = c.ra.deg + dx / 60 / np.cos(np.radians(c.dec.deg))
        gr = np.clip(rng.normal(0.9, 0.35, n_total), 0.2, 1.6)
        ri = np.clip(0.42 * gr - 0.05 + rng.normal(0, 0.06, n_total), -0.1, 0.9)
        # Keep stars a few arcsec away from the target so it is not blended.
        keep = rr * 60 > 8
        for k in np.flatnonzero(keep):
            rows.append((f"F{ti}-{k:04d}", ra[k], dec[k], rmag[k] + gr[k], rmag[k],
                         rmag[k] - ri[k], "star"))
        rows.append((tgt.name, c.ra.deg, c.dec.deg, tgt.r_mag + tgt.g_minus_r, tgt.r_mag,
                     tgt.r_mag - tgt.r_minus_i, "target"))
        # The night's random walk of the blazar, 0.3 mag peak to peak in r.
        steps = rng.normal(0, 1, opts.science_per_target)
        walk = np.cumsum(steps)
        walk = walk - walk.mean()
        span = walk.max() - walk.min()
        walks[tgt.name] = walk * (0.3 / span if span > 0 else 0.0)
    table = Table(rows=rows, names=("id", "ra", "dec", "g", "r", "i", "kind"),
                  dtype=("U24", "f8", "f8", "f8", "f8", "f8", "U8"))
    table["G"] = table["r"] + 0.1 - 0.35 * (table["g"] - table["r"])
    table["in_catalog"] = table["r"] < opts.catalog_depth_mag
    # Plant a variable star the automatic comparison selection would love:
    # bright, unsaturated, close to the target.
    for tgt in TARGETS:
        tc = SkyCoord(*_target_deg(tgt), unit="deg")
        sc = SkyCoord(table["ra"], table["dec"], unit="deg")
        sep_arcmin = tc.separation(sc).arcmin
        ok = (table["kind"] == "star") & (sep_arcmin > 0.3) & (sep_arcmin < 1.5) \
            & (table["r"] > 14.0) & (table["r"] < 16.5)
        if not ok.any():
            ok = (table["kind"] == "star") & (sep_arcmin > 0.3) & (sep_arcmin < 1.8)
            k = int(np.flatnonzero(ok)[0])
            shift = table["r"][k] - 15.2  # brighten it to r = 15.2, colours kept
            for b in ("g", "r", "i", "G"):
                table[b][k] -= shift
        else:
            k = int(np.flatnonzero(ok)[np.argmin(table["r"][ok])])
        table["kind"][k] = "variable"
        variables[tgt.name] = str(table["id"][k])
    return Sky(table, walks, variables)


def _target_deg(tgt: Target) -> tuple[float, float]:
    c = SkyCoord(tgt.ra_text, tgt.dec_text, unit=(u.hourangle, u.deg))
    return float(c.ra.deg), float(c.dec.deg)


VARIABLE_AMPLITUDE_MAG = 0.08  # semi-amplitude of the planted variable field star
VARIABLE_PERIOD_D = 0.11


def star_mags(sky: Sky, band: str, target: str, index: int, mjd: float) -> np.ndarray:
    """True standard magnitudes of every star in ``band`` at one science frame."""
    t = sky.table
    mags = np.array(t[band], dtype=float)
    scale = {"g": 1.15, "r": 1.0, "i": 0.9}[band]  # a blazar is bluer when brighter
    for name, walk in sky.target_walk.items():
        k = np.flatnonzero(t["id"] == name)[0]
        if name == target and 0 <= index < len(walk):
            mags[k] += scale * walk[index]
    for _name, sid in sky.variable_star.items():
        k = np.flatnonzero(t["id"] == sid)[0]
        mags[k] += VARIABLE_AMPLITUDE_MAG * math.sin(2 * math.pi * mjd / VARIABLE_PERIOD_D)
    return mags


# ---------------------------------------------------------------------------
# Camera fixed patterns (deterministic per seed, cached per process)
# ---------------------------------------------------------------------------

@lru_cache(maxsize=6)
def camera_patterns(seed: int, band: str, binning: int,
                    shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """True bias pattern (ADU), flat response (mean 1) and hot-pixel dark current (e-/s).

    ``shape`` is the frame's (ny, nx) as read out; default: the E2V frame at ``binning``.
    """
    opts = SimOptions(seed=seed, small=binning != 1)
    ny, nx = opts.shape if shape is None else shape
    cam = CAMERAS[band]
    rng = _rng(opts, 2, BANDS.index(band))
    # Bias: a level, a fixed column pattern and a gentle row gradient.
    cols = rng.normal(0.0, 2.5, nx) + 1.5 * np.sin(np.arange(nx) / nx * 7.0)
    rows = np.linspace(-1.0, 1.0, ny)
    bias = (cam.bias_level_adu + cols[None, :] + rows[:, None]).astype(np.float32)
    # Flat: vignetting, 1 % pixel response and a dust donut.
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    cx, cy = nx * 0.52, ny * 0.48
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (0.5 * math.hypot(nx, ny)) ** 2
    flat = 1.0 - 0.07 * r2
    flat *= rng.normal(1.0, 0.01, (ny, nx)).astype(np.float32)
    dx0, dy0 = nx * rng.uniform(0.2, 0.8), ny * rng.uniform(0.2, 0.8)
    rad = np.sqrt((xx - dx0) ** 2 + (yy - dy0) ** 2) * binning  # unbinned px
    flat *= 1.0 - 0.04 * np.exp(-0.5 * ((rad - 60.0) / 12.0) ** 2)
    flat /= flat.mean()
    dark = np.full((ny, nx), cam.dark_e_per_s, np.float32)
    hot = rng.integers(0, ny * nx, 40)
    dark.flat[hot] = rng.uniform(2.0, 20.0, hot.size)
    return {"bias": bias, "flat": flat.astype(np.float32), "dark": dark}


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def moffat_alpha(fwhm_px: float, beta: float = MOFFAT_BETA) -> float:
    """Moffat core width alpha (px) for a given FWHM (px)."""
    return fwhm_px / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _add_star(img: np.ndarray, x: float, y: float, flux: float, fwhm_px: float) -> None:
    """Add a Moffat star holding exactly ``flux`` (image units) centred at (x, y)."""
    if flux <= 0:
        return
    ny, nx = img.shape
    alpha = moffat_alpha(fwhm_px)
    beta = MOFFAT_BETA
    # Stamp out to where the profile falls below ~0.02 e-, 3-8 FWHM.
    peak = flux * (beta - 1) / (math.pi * alpha**2)
    r_lim = alpha * math.sqrt(max((peak / 0.02) ** (1 / beta) - 1, 0.0))
    half = int(math.ceil(min(max(r_lim, 3 * fwhm_px), 8 * fwhm_px)))
    x0, x1 = max(int(x) - half, 0), min(int(x) + half + 1, nx)
    y0, y1 = max(int(y) - half, 0), min(int(y) + half + 1, ny)
    if x0 >= x1 or y0 >= y1:
        return
    # Integrate over the pixel by sub-sampling when the PSF is only a few pixels wide.
    sub = 5 if fwhm_px < 6 else (3 if fwhm_px < 12 else 1)
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    gx = (np.arange(x0, x1)[:, None] + offs[None, :]).ravel() - x
    gy = (np.arange(y0, y1)[:, None] + offs[None, :]).ravel() - y
    prof = (1 + (gy[:, None] ** 2 + gx[None, :] ** 2) / alpha**2) ** (-beta)
    if sub > 1:
        prof = prof.reshape(y1 - y0, sub, x1 - x0, sub).mean(axis=(1, 3))
    # The whole flux of the star is placed in the stamp (the cut wings hold < 0.03 %),
    # so the truth's flux is exactly what the image holds; a stamp cut by the frame
    # edge keeps only its share.
    full_half = half
    if x0 == int(x) - full_half and x1 == int(x) + full_half + 1 \
            and y0 == int(y) - full_half and y1 == int(y) + full_half + 1:
        norm = prof.sum()
    else:
        norm = _moffat_square_sum(x, y, alpha, full_half, sub)
    img[y0:y1, x0:x1] += (flux / norm * prof).astype(img.dtype)


def _moffat_square_sum(x: float, y: float, alpha: float, half: int, sub: int) -> float:
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    gx = (np.arange(int(x) - half, int(x) + half + 1)[:, None] + offs).ravel() - x
    gy = (np.arange(int(y) - half, int(y) + half + 1)[:, None] + offs).ravel() - y
    prof = (1 + (gy[:, None] ** 2 + gx[None, :] ** 2) / alpha**2) ** (-MOFFAT_BETA)
    return float(prof.sum()) / (sub * sub)


def _cosmics(rng: np.random.Generator, shape: tuple[int, int], exptime_s: float,
             binning: int) -> list[tuple[float, float, float, list[tuple[int, int, float]]]]:
    """Cosmic-ray tracks: (x, y, total e-, [(iy, ix, e-), ...])."""
    ny, nx = shape
    area_cm2 = ny * nx * (binning * PIXEL_SIZE_CM) ** 2
    n = rng.poisson(COSMIC_RATE_PER_CM2_MIN * area_cm2 * (exptime_s + READOUT_S) / 60.0)
    hits = []
    for _ in range(n):
        x, y = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        length = rng.exponential(4.0) / binning  # unbinned px -> this binning
        ang = rng.uniform(0, np.pi)
        total = rng.uniform(800.0, 6000.0)
        steps = max(int(math.ceil(length)), 1)
        pix = []
        for s in range(steps):
            ix = int(round(x + s * math.cos(ang)))
            iy = int(round(y + s * math.sin(ang)))
            if 0 <= ix < nx and 0 <= iy < ny:
                pix.append((iy, ix, total / steps))
        hits.append((x, y, total, pix))
    return hits


def _wcs_for(ra_deg: float, dec_deg: float, rot_deg: float, scale_arcsec: float,
             shape: tuple[int, int]) -> WCS:
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra_deg, dec_deg]
    w.wcs.crpix = [(nx + 1) / 2, (ny + 1) / 2]
    s = scale_arcsec / 3600.0
    th = math.radians(rot_deg)
    # East left, north up, then rotated by th (north through east).
    w.wcs.cd = np.array([[-s * math.cos(th), s * math.sin(th)],
                         [s * math.sin(th), s * math.cos(th)]])
    w.wcs.radesys = "ICRS"
    w.wcs.equinox = 2000.0
    return w


@dataclass
class RenderJob:
    """Everything one worker needs to render one raw frame."""

    opts: SimOptions
    band: str
    plan: FramePlan
    truth: FrameTruth
    stars: list = field(default_factory=list)  # [(x, y, flux_e)] one set per image
    star_truth: dict | None = None  # id, x, y, flux_e, mag of every star on the frame


def render(job: RenderJob) -> tuple[bytes, list[tuple[float, float, float]]]:
    """Render a raw frame; returns its FITS bytes and its cosmic-ray hits (x, y, e-)."""
    opts, cam, plan, tr = job.opts, sim_cameras(job.opts)[job.band], job.plan, job.truth
    shape = opts.shape
    pat = camera_patterns(opts.seed, job.band, opts.binning, shape)
    rng = _rng(opts, 3, BANDS.index(job.band), plan.number)
    light = np.zeros(shape, np.float32)
    if plan.kind == "flat":
        level_e = plan.flat_level_adu * cam.gain_e_per_adu
        light += level_e
        # Twilight flats catch a few stars; the combine must clip them out.
        for _ in range(4):
            _add_star(light, rng.uniform(0, shape[1]), rng.uniform(0, shape[0]),
                      rng.uniform(2e4, 2e5), 2.2 / (cam.pixel_scale_arcsec * opts.binning))
    elif plan.kind in ("object", "focus"):
        light += np.float32(tr.sky_e_per_px or 0.0)
        for xs, ys, fl in job.stars:
            for x, y, f in zip(xs, ys, fl, strict=True):
                _add_star(light, x, y, f, tr.fwhm_px)
    expected = light * pat["flat"] + pat["dark"] * np.float32(plan.exptime_s)
    electrons = rng.poisson(expected).astype(np.float32)
    hits = _cosmics(rng, shape, plan.exptime_s, opts.binning)
    for _x, _y, _tot, pix in hits:
        for iy, ix, e in pix:
            electrons[iy, ix] += e
    electrons += rng.normal(0.0, cam.read_noise_e, shape).astype(np.float32)
    drift = rng.normal(0.0, 0.3)  # the bias level wanders a little between frames
    adu = pat["bias"] + np.float32(drift) + electrons / np.float32(cam.gain_e_per_adu)
    data = np.clip(np.rint(adu), 0, SATURATION_ADU).astype(np.uint16)

    hdr = fits.Header()
    hdr["DATE-OBS"] = (tr.date_obs, "UTC start of exposure")
    hdr["FRAMENUM"] = (plan.number, "camera frame counter")
    hdr["EXPTIME"] = (tr.camera_exptime_s, "[s] exposure time (camera)")
    hdr["INSTRUME"] = (f"XL126-{job.band.upper()}", "three-channel imager camera")
    hdr["DETECTOR"] = ("E2V 2536x3358" if opts.frame_shape is None
                       else f"SIM {shape[1] * opts.binning}x{shape[0] * opts.binning}", "")
    hdr["XBINNING"] = (opts.binning, "")
    hdr["YBINNING"] = (opts.binning, "")
    hdr["CCD-TEMP"] = (round(float(-100.0 + rng.normal(0, 0.2)), 2), "[C]")
    hdu = fits.PrimaryHDU(data=data, header=hdr)
    buf = io.BytesIO()
    hdu.writeto(buf)
    return buf.getvalue(), [(x, y, tot) for x, y, tot, _ in hits]


# ---------------------------------------------------------------------------
# The night
# ---------------------------------------------------------------------------

def raw_name(opts: SimOptions, band: str, number: int) -> str:
    """Path of a raw frame relative to ``OUTDIR/raw``."""
    if opts.layout == "names":
        return f"xl126_{band}_{number:04d}.fits"
    return f"{band}/xl126{band}_{number:04d}.fits"


def _seeing_walk(opts: SimOptions, n: int) -> np.ndarray:
    rng = _rng(opts, 4)
    # Zenith seeing wanders between 1.3" and 2.2" over the night (r band); with
    # airmass and wavelength the delivered FWHM stays within 1.5"-3.0".
    x = np.cumsum(rng.normal(0, 0.12, n))
    x = (x - x.min()) / max(x.max() - x.min(), 1e-9)
    return 1.3 + 0.9 * x


def build_jobs(opts: SimOptions, sky: Sky, plans: list[FramePlan]) -> list[RenderJob]:
    """Turn the plan into per-camera render jobs with their truth."""
    rng = _rng(opts, 5)
    seeing = _seeing_walk(opts, len(plans))
    shape = opts.shape
    cameras = sim_cameras(opts)
    t = sky.table
    sky_coords = SkyCoord(t["ra"], t["dec"], unit="deg")
    targets = {tg.name: tg for tg in TARGETS}
    # The log's coordinates are the target's; the telescope really points up to
    # ~1' away (pointing model), then drifts by up to ~20" between frames.
    offsets = {name: rng.uniform(-40, 40, 2) for name in targets}
    drift = {name: np.zeros(2) for name in targets}
    index = {name: 0 for name in targets}
    jobs: list[RenderJob] = []
    for pi, plan in enumerate(plans):
        start = Time(plan.start, scale="utc")
        mid = start + plan.exptime_s / 2 * u.s
        rot_jitter = float(np.clip(rng.normal(0, 0.15), -0.45, 0.45))
        point = None
        if plan.kind in ("object", "focus"):
            name = plan.target if plan.target in targets else TARGETS[0].name
            step = np.clip(rng.normal(0, 7.0, 2), -20, 20)
            drift[name] = 0.7 * drift[name] + step
            ra0, dec0 = _target_deg(targets[name])
            off = offsets[name] + drift[name]
            point = (ra0 + off[0] / 3600 / math.cos(math.radians(dec0)), dec0 + off[1] / 3600)
        k_index = index.get(plan.target, 0)
        transparency = float(np.clip(rng.normal(0.99, 0.01), 0.95, 1.0))
        if plan.defect == "cloud":
            transparency = 0.03
        double_shift = rng.uniform(12, 25, 2) * rng.choice([-1, 1], 2)
        for band in BANDS:
            cam = cameras[band]
            tr = FrameTruth(
                path=raw_name(opts, band, plan.number), band=band, number=plan.number,
                kind=plan.kind, target=plan.target, in_log=plan.in_log, defect=plan.defect,
                date_obs=plan.start, mjd_start=float(start.mjd), mjd_mid=float(mid.mjd),
                exptime_s=plan.exptime_s,
                camera_exptime_s=(plan.exptime_s if plan.camera_exptime_s is None
                                  else plan.camera_exptime_s),
            )
            job = RenderJob(opts, band, plan, tr)
            if point is not None:
                c0 = SkyCoord(point[0], point[1], unit="deg")
                cb = c0.spherical_offsets_by(cam.offset_arcsec[0] * u.arcsec,
                                             cam.offset_arcsec[1] * u.arcsec)
                rot = cam.rotation_deg + rot_jitter
                scale = cam.pixel_scale_arcsec * opts.binning
                w = _wcs_for(cb.ra.deg, cb.dec.deg, rot, scale, shape)
                altaz = c0.transform_to(AltAz(obstime=mid, location=SITE))
                airmass = float(altaz.secz)
                fwhm = float(np.clip(seeing[pi] * cam.seeing_factor * airmass**0.6, 1.5, 3.0))
                sky_mag = cam.sky_mag_per_arcsec2 - 0.4 * (airmass - 1.0)
                sky_e = 10 ** (-0.4 * (sky_mag - cam.zeropoint_mag)) * scale**2 * plan.exptime_s
                tr.airmass = airmass
                tr.fwhm_arcsec = fwhm
                tr.fwhm_px = fwhm / scale
                tr.sky_e_per_px = float(sky_e)
                tr.sky_adu = float(sky_e / cam.gain_e_per_adu)
                tr.transparency = transparency
                tr.pointing_ra_deg, tr.pointing_dec_deg = float(cb.ra.deg), float(cb.dec.deg)
                tr.rotation_deg = rot
                tr.wcs = {k: w.to_header()[k] for k in w.to_header()}
                mags = star_mags(sky, band, plan.target, k_index, float(mid.mjd))
                c1, c2 = cam.colour
                colour = np.asarray(t[c1]) - np.asarray(t[c2])
                inst = (mags + cam.colour_term * colour
                        + cam.extinction_mag_per_airmass * airmass)
                flux = 10 ** (-0.4 * (inst - cam.zeropoint_mag)) * plan.exptime_s * transparency
                x, y = w.world_to_pixel(sky_coords)
                margin = 10 * tr.fwhm_px
                on = (x > -margin) & (x < shape[1] + margin) & (y > -margin) \
                    & (y < shape[0] + margin)
                if plan.defect == "double":
                    # The mount jumped half-way through: two images of everything.
                    sx, sy = double_shift / (cam.pixel_scale_arcsec * opts.binning)
                    job.stars = [(x[on], y[on], flux[on] / 2),
                                 (x[on] + sx, y[on] + sy, flux[on] / 2)]
                else:
                    job.stars = [(x[on], y[on], flux[on])]
                job.star_truth = {
                    "id": np.asarray(t["id"])[on], "x": x[on], "y": y[on],
                    "flux_e": flux[on], "mag": mags[on],
                }
            jobs.append(job)
        if plan.kind == "object":
            index[plan.target] = k_index + 1
    return jobs


def _render_and_write(job: RenderJob, raw_dir: str) -> list[tuple[float, float, float]]:
    data, hits = render(job)
    path = Path(raw_dir) / job.truth.path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hits


def _write_chunked(path: Path, data: bytes, chunks: int, pause_s: float) -> None:
    """Write a file in pieces under its final name, as a camera over SMB would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = len(data)
    with open(path, "wb") as fh:
        for k in range(chunks):
            fh.write(data[k * size // chunks:(k + 1) * size // chunks])
            fh.flush()
            if k < chunks - 1:
                time.sleep(pause_s)


def _write_log(raw_dir: Path, opts: SimOptions, lines: list[str]) -> Path:
    path = raw_dir / f"{opts.night.replace('-', '')}.log"
    text = "# Xinglong 1.26m three-channel imager, night of " + opts.night + "\r\n"
    text += "".join(line + "\r\n" for line in lines)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(text.encode("utf-8"))
    os.replace(tmp, path)
    return path


def simulate_night(outdir: str | Path, opts: SimOptions | None = None, *,
                   arrival_s: float | None = None,
                   progress: Callable[[str], None] | None = None) -> Path:
    """Simulate a whole night into ``outdir`` and return the raw folder.

    Parameters
    ----------
    outdir : path
        Destination folder (created).
    opts : SimOptions
        What night to make (seed, size, layout, log timing).
    arrival_s : float, optional
        Write frames over time, one exposure (three cameras) every
        ``arrival_s`` seconds, each file in several chunks; ``None`` writes as
        fast as possible with all cores.
    progress : callable, optional
        Called with a one-line message as the night advances.
    """
    opts = opts or SimOptions()
    say = progress or (lambda _m: None)
    out = Path(outdir)
    raw_dir = out / "raw"
    truth_dir = out / "truth"
    raw_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    plans = plan_night(opts)
    sky = make_sky(opts)
    jobs = build_jobs(opts, sky, plans)
    _write_truth(out, opts, sky, plans, jobs)
    lines = log_lines(plans, opts)
    if opts.log == "start":
        _write_log(raw_dir, opts, lines)
    cosmics: list[tuple[str, int, float, float, float]] = []
    if arrival_s is None:
        workers = opts.workers or os.cpu_count() or 1
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_render_and_write, j, str(raw_dir)): j for j in jobs}
            for n, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                job = futures[fut]
                cosmics += [(job.band, job.plan.number, x, y, e) for x, y, e in fut.result()]
                if n % 30 == 0 or n == len(jobs):
                    say(f"simulate: {n}/{len(jobs)} frames written "
                        f"({time.perf_counter() - t0:.1f} s)")
        if opts.log == "growing":
            _write_log(raw_dir, opts, lines)
    else:
        by_number: dict[int, list[RenderJob]] = {}
        for j in jobs:
            by_number.setdefault(j.plan.number, []).append(j)
        written: list[int] = []
        next_t = time.monotonic()
        for number, group in sorted(by_number.items()):
            rendered = [(j, render(j)) for j in group]
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            for j, (data, hits) in rendered:
                _write_chunked(raw_dir / j.truth.path, data, chunks=4,
                               pause_s=min(0.05, arrival_s / 20))
                cosmics += [(j.band, number, x, y, e) for x, y, e in hits]
            written.append(number)
            next_t = time.monotonic() + arrival_s
            say(f"simulate: exposure {number} written by {len(group)} cameras")
            if opts.log == "growing":
                done = [p for p in plans if p.number in set(written)]
                _write_log(raw_dir, opts, log_lines(done, opts))
    Table(rows=cosmics or None, names=("band", "frame", "x", "y", "e"),
          dtype=("U1", "i4", "f8", "f8", "f8")).write(truth_dir / "cosmics.ecsv",
                                                      overwrite=True)
    if opts.log in ("end", "growing"):
        _write_log(raw_dir, opts, lines)
    say(f"simulate: night of {opts.night} ready in {out} "
        f"({len(jobs)} frames, {time.perf_counter() - t0:.1f} s)")
    return raw_dir


def _write_truth(out: Path, opts: SimOptions, sky: Sky, plans: list[FramePlan],
                 jobs: list[RenderJob]) -> None:
    truth_dir = out / "truth"
    t = sky.table
    # The reference catalog as a survey would publish it: noisy magnitudes with
    # errors, Gaia-like G, proper motions at epoch 2016.0 (tiny for these faint
    # high-latitude stars), nothing fainter than r = 21.
    rng = _rng(opts, 6)
    cat = t[t["in_catalog"] & ((t["kind"] != "target") | (opts.catalog_targets != "none"))]
    catalog = Table()
    catalog["id"] = cat["id"]
    if opts.catalog_targets == "spaced":
        catalog["id"] = [re.sub(r"^([A-Za-z]+)(\d)", r"\1 \2", str(i)) if k == "target"
                         else str(i) for i, k in zip(cat["id"], cat["kind"], strict=True)]
    catalog["ra"] = cat["ra"]
    catalog["dec"] = cat["dec"]
    for b in BANDS:
        err = 0.005 + 0.02 * 10 ** (0.4 * (np.asarray(cat["r"]) - 20.0))
        err = np.minimum(err, 0.2)
        catalog[b] = np.round(cat[b] + rng.normal(0, err), 4)
        catalog[f"{b}_err"] = np.round(err, 4)
    catalog["G"] = np.round(cat["G"] + rng.normal(0, 0.003, len(cat)), 4)
    catalog["pmra"] = np.zeros(len(cat))
    catalog["pmdec"] = np.zeros(len(cat))
    catalog["epoch"] = np.full(len(cat), 2016.0)
    for col, unit in (("ra", u.deg), ("dec", u.deg), ("pmra", u.mas / u.yr),
                      ("pmdec", u.mas / u.yr)):
        catalog[col].unit = unit
    catalog.meta["comments"] = [f"photd simulated reference catalog (seed {opts.seed})"]
    catalog.write(out / "catalog.ecsv", overwrite=True)
    stars = t.copy()
    stars.write(truth_dir / "stars.ecsv", overwrite=True)

    rows = []
    for j in jobs:
        st = j.star_truth
        if st is None:
            continue
        for sid, x, y, f, m in zip(st["id"], st["x"], st["y"], st["flux_e"], st["mag"],
                                   strict=True):
            rows.append((j.band, j.plan.number, sid, float(x), float(y), float(f), float(m)))
    Table(rows=rows or None, names=("band", "frame", "id", "x", "y", "flux_e", "mag"),
          dtype=("U1", "i4", "U24", "f8", "f8", "f8", "f8")).write(
        truth_dir / "frame_stars.ecsv", overwrite=True)

    for b in BANDS:
        pat = camera_patterns(opts.seed, b, opts.binning, opts.shape)
        fits.PrimaryHDU(pat["bias"]).writeto(truth_dir / f"bias_{b}.fits", overwrite=True)
        fits.PrimaryHDU(pat["flat"]).writeto(truth_dir / f"flat_{b}.fits", overwrite=True)
        fits.PrimaryHDU(pat["dark"]).writeto(truth_dir / f"dark_{b}.fits", overwrite=True)

    night = {
        "seed": opts.seed,
        "options": asdict(opts),
        "binning": opts.binning,
        "shape_yx": list(opts.shape),
        "site": {"lon_deg": 117.577222, "lat_deg": 40.395833, "height_m": 960.0},
        "moffat_beta": MOFFAT_BETA,
        "saturation_adu": SATURATION_ADU,
        "cameras": {b: asdict(c) for b, c in sim_cameras(opts).items()},
        "targets": [
            {"name": tg.name, "ra_text": tg.ra_text, "dec_text": tg.dec_text,
             "log_ra_text": log_coordinates(tg, opts)[0],
             "log_dec_text": log_coordinates(tg, opts)[1],
             "ra_deg": _target_deg(tg)[0], "dec_deg": _target_deg(tg)[1],
             "variable_star": sky.variable_star[tg.name],
             "walk_r_mag": [float(v) for v in sky.target_walk[tg.name]]}
            for tg in TARGETS
        ],
        "variable_star": {"amplitude_mag": VARIABLE_AMPLITUDE_MAG,
                          "period_d": VARIABLE_PERIOD_D},
        "frames": [asdict(j.truth) for j in jobs],
    }
    (truth_dir / "night.json").write_text(json.dumps(night, indent=1))


# ---------------------------------------------------------------------------
# Reading the truth back (for tests and the demo)
# ---------------------------------------------------------------------------

@dataclass
class Truth:
    """A simulated night's truth, loaded from ``OUTDIR/truth``."""

    night: dict
    stars: Table
    frame_stars: Table
    cosmics: Table
    root: Path

    def frame(self, band: str, number: int) -> dict:
        """The truth of one raw frame."""
        for f in self.night["frames"]:
            if f["band"] == band and f["number"] == number:
                return f
        raise KeyError(f"no frame {number} in band {band}")

    def frames(self, kind: str | None = None, band: str | None = None) -> list[dict]:
        """All frames, optionally of one kind and band."""
        return [f for f in self.night["frames"]
                if (kind is None or f["kind"] == kind) and (band is None or f["band"] == band)]

    def camera(self, band: str) -> dict:
        """True gain, read noise, bias level, scale ... of one camera."""
        return self.night["cameras"][band]

    def pattern(self, kind: str, band: str) -> np.ndarray:
        """The true bias pattern (ADU), flat response (mean 1) or dark current (e-/s)."""
        return fits.getdata(self.root / "truth" / f"{kind}_{band}.fits")

    def wcs(self, band: str, number: int) -> WCS:
        """The true WCS of a science frame."""
        return WCS(fits.Header(self.frame(band, number)["wcs"]))


def load_truth(outdir: str | Path) -> Truth:
    """Load the truth written by :func:`simulate_night`."""
    root = Path(outdir)
    night = json.loads((root / "truth" / "night.json").read_text())
    stars = Table.read(root / "truth" / "stars.ecsv")
    frame_stars = Table.read(root / "truth" / "frame_stars.ecsv")
    cosmics = Table.read(root / "truth" / "cosmics.ecsv")
    return Truth(night, stars, frame_stars, cosmics, root)
