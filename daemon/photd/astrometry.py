"""Astrometry: detect sources, match them to the reference catalog, fit a TAN WCS.

Numeric only: arrays and tables in, results out; no file, database or clock
access (paper §4.3 does this with SExtractor + SCAMP; we do it in-process).

The steps, each callable on its own:

1. :func:`detect_sources` finds stars on a bias-subtracted frame. Full-size
   frames are heavily oversampled (FWHM 14-28 px at 0.107"/px), so detection
   runs on a sum-binned copy (FWHM 3-7 px there), which is ~10x faster and
   gives a better matched filter; centroids are windowed positions mapped back
   to full-resolution pixels.
2. :func:`check_sources` is the part of the quality gate that needs no
   catalog: too few sources (clouds), elongated images, double exposures.
3. :func:`solve` matches the sources to catalog stars projected through the
   header's guess WCS with triangle invariants (a similarity transform voted
   for by many triangle pairs), refines the match by iterative nearest
   neighbours and fits a TAN (optionally TAN-SIP) WCS. A fit must then prove
   itself (:func:`_gate`, :func:`_verify`): residuals of centroid size, its own
   uncertainty small everywhere on the frame, the brightest catalog stars it
   predicts landing on detections far beyond chance, scale, skew, parity and
   rotation as configured. Numerical failures are ``BadFit("fit_failed")``.
4. :func:`relative_solution` registers a frame to an earlier solved frame of
   the same field when the catalog is unreachable.

Pixel coordinates are 0-based (numpy / astropy ``origin=0``) throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import astropy.units as u
import numpy as np
import sep
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import fit_wcs_from_points, proj_plane_pixel_scales
from scipy.spatial import cKDTree

from photd.config import AstrometryConfig
from photd.errors import FrameStop

__all__ = [
    "BadFit",
    "Solution",
    "check_sources",
    "detect_sources",
    "relative_solution",
    "solve",
    "wcs_rotation_deg",
    "wcs_scale_arcsec",
]


class BadFit(FrameStop):
    """A frame that cannot (or must not) be solved.

    Parameters
    ----------
    reason : str
        Machine-readable reason: ``too_few_sources``, ``too_few_matches``,
        ``high_residual``, ``elongated``, ``double_exposure``, ``bad_scale``,
        ``bad_rotation``, ``large_offset``, ``unverified`` (the fit's other
        predictions do not land on detections, or its own uncertainty over the
        frame is too large), ``fit_failed`` (a numerical failure: NaN or
        degenerate positions, a least-squares solve that did not converge).
    message : str
        A sentence with the evidence.
    """

    state = "badfit"

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


@dataclass
class Solution:
    """A fitted WCS and how good it is.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        The fitted celestial WCS (0-based pixel convention when used with
        ``origin=0``; FITS CRPIX as usual in the header).
    n_matches : int
        Source-catalog pairs used in the final fit.
    rms_arcsec : float
        RMS of the fit residuals on the sky (arcsec).
    scale_arcsec : float
        Mean pixel scale of the fitted WCS (arcsec per pixel of this frame).
    rotation_deg : float
        Position angle of the frame's +y axis, east of north (degrees).
    offset_arcsec : float
        Distance between the frame centre through the guess and through the
        fitted WCS (arcsec): how far the header pointing was off.
    matches : astropy.table.Table
        Matched pairs: ``source`` (row in the sources table), ``catalog`` (row
        in the catalog, or in the reference sources for a relative solution),
        ``x``, ``y`` (px), ``ra``, ``dec`` (deg), ``dx``, ``dy`` (fit residual, px).
    relative : bool
        True when registered to another frame instead of the catalog.
    """

    wcs: WCS
    n_matches: int
    rms_arcsec: float
    scale_arcsec: float
    rotation_deg: float
    offset_arcsec: float
    matches: Table = field(repr=False)
    relative: bool = False


# ---------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------

# Binned images up to this many pixels keep detection well under 0.1 s.
_TARGET_BINNED_PIXELS = 6.0e5
# sep allocates its pixel stack on every extract() call, so its size is most
# of the cost of a pass (0.007 s at 300 000, 0.05 s at 2 000 000 on a binned
# full frame): start small, retry large when a frame (clouds, a bright
# extended blob) fills it.
_SEP_PIX_STACKS = (300_000, 2_000_000)


def _extract(data: np.ndarray, thresh: float, **kw: Any) -> np.ndarray:
    """``sep.extract`` with the smallest pixel stack that holds the frame's objects."""
    sep.set_sub_object_limit(4096)
    for k, size in enumerate(_SEP_PIX_STACKS):
        sep.set_extract_pixstack(size)
        try:
            return sep.extract(data, thresh, **kw)
        except Exception as exc:  # sep raises a bare Exception for a full buffer
            if "pixel buffer full" not in str(exc) or k == len(_SEP_PIX_STACKS) - 1:
                raise
    raise AssertionError("unreachable")
# Fewer confident (10 sigma) stars than this and the PSF cannot be trusted: a frame
# through thick cloud. Fewer than this could not be solved anyway.
_MIN_PSF_STARS = 5
# The main pass's threshold is in units of the unfiltered pixel noise (as SExtractor's
# DETECT_THRESH) while it is applied to the filtered image, whose noise is only
# sqrt(sum k^2) of that: a star needs a matched-filter S/N of about
# detect_sigma * 2 sqrt(pi) sigma_psf, ~50 at 7 px FWHM. A rich field still gives
# dozens of stars; a sparse one sampled at 5-7 px per FWHM (0.4"/px in 2-3" seeing)
# kept 5-10 of its ~80 catalog stars and failed too_few_matches. Below this many
# star-like sources, a deep pass at a true matched-filter S/N of _DEEP_SNR (~2 mag
# deeper) replaces it; frames with enough stars are detected exactly as before.
_DEEP_BELOW = 30
_DEEP_SNR = 8.0
# A detection whose peak pixel holds more than this / FWHM_binned^2 of its flux is not
# a star (a star: ~0.7, with the moment FWHM overestimated by 1.5x still ~1.6).
_SHARP_CONCENTRATION = 3.5
# The FWHM is measured on stars whose peak stands this many sigma above the sky.
_FWHM_MIN_PEAK_SIGMA = 10.0


def auto_binning(shape: tuple[int, int]) -> int:
    """Binning factor that brings a frame to at most ~0.6 Mpx.

    Full-size frames (2536 x 3358) get 4 (FWHM 14-28 px becomes 3.5-7 px);
    on-chip binned frames (507 x 671) get 1.
    """
    npix = shape[0] * shape[1]
    return max(1, math.ceil(math.sqrt(npix / _TARGET_BINNED_PIXELS)))


def _bin_sum(data: np.ndarray, b: int) -> np.ndarray:
    """Sum ``b x b`` blocks (edge rows/columns that do not fill a block are dropped)."""
    if b == 1:
        return np.ascontiguousarray(data, dtype=np.float32)
    ny, nx = (data.shape[0] // b) * b, (data.shape[1] // b) * b
    d = data[:ny, :nx]
    # Adding b*b strided views is several times faster than reshape(...).sum(axis=(1, 3)).
    out = np.zeros((ny // b, nx // b), np.float32)
    for j in range(b):
        for i in range(b):
            out += d[j::b, i::b]
    return out


def _bin_mask(mask: np.ndarray, b: int) -> np.ndarray:
    if b == 1:
        return np.asarray(mask, dtype=bool)
    ny, nx = (mask.shape[0] // b) * b, (mask.shape[1] // b) * b
    m = np.asarray(mask, dtype=bool)[:ny, :nx]
    # OR of strided views (rows, then columns): ~15x faster than reshape(...).any(axis=(1, 3)).
    rows = m[0::b].copy()
    for j in range(1, b):
        rows |= m[j::b]
    out = rows[:, 0::b].copy()
    for i in range(1, b):
        out |= rows[:, i::b]
    return out


def _gaussian_kernel(fwhm_px: float) -> np.ndarray:
    sigma = fwhm_px / 2.3548
    half = max(1, int(math.ceil(2.5 * sigma)))
    g = np.arange(-half, half + 1, dtype=np.float32)
    k = np.exp(-0.5 * (g[:, None] ** 2 + g[None, :] ** 2) / sigma**2)
    return (k / k.sum()).astype(np.float32)


def _halfmax_fwhm(img: np.ndarray, x: np.ndarray, y: np.ndarray, bkg: np.ndarray,
                  half: int) -> np.ndarray:
    """FWHM (px) from the area above half the peak in a cutout around each star.

    A model-free estimate: the area above half maximum of a round PSF is
    pi (FWHM/2)^2 whatever its wings (Moffat or Gaussian).
    """
    ny, nx = img.shape
    out = np.full(len(x), np.nan)
    for k in range(len(x)):
        ix, iy = int(round(x[k])), int(round(y[k]))
        if ix - half < 0 or iy - half < 0 or ix + half >= nx or iy + half >= ny:
            continue
        cut = img[iy - half:iy + half + 1, ix - half:ix + half + 1] - bkg[k]
        # The peak from the 3x3 core mean is less noisy than the single brightest pixel.
        c = cut[half - 1:half + 2, half - 1:half + 2]
        peak = float(c.max())
        if peak <= 0:
            continue
        area = float(np.count_nonzero(cut > 0.5 * peak))
        out[k] = 2.0 * math.sqrt(area / math.pi)
    return out


def detect_sources(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    detect_sigma: float = 5.0,
    binning: int | None = None,
    saturation: float | None = None,
    max_sources: int = 500,
) -> tuple[Table, float, float]:
    """Find stars on a bias-subtracted frame.

    Parameters
    ----------
    data : numpy.ndarray
        Bias-subtracted (optionally flat-fielded) image, any units (ADU or e-).
    mask : numpy.ndarray of bool, optional
        True where pixels are bad and must be ignored.
    detect_sigma : float
        Detection threshold in units of the (binned) background RMS after
        matched filtering.
    binning : int, optional
        Detect on a ``binning x binning`` sum-binned copy; ``None`` chooses
        from the frame size (:func:`auto_binning`).
    saturation : float, optional
        Level (data units, per unbinned pixel) above which a source is flagged
        saturated; ``None`` = no saturation flag.
    max_sources : int
        Keep at most this many (the brightest) sources.

    Returns
    -------
    sources : astropy.table.Table
        One row per source, brightest first: ``x``, ``y`` (0-based px of the
        full-resolution frame), ``flux`` (data units, background subtracted),
        ``peak`` (data units per unbinned px), ``pos_err`` (px, estimated
        centroid error per axis), ``a``, ``b`` (px, second-moment
        semi-axes), ``theta`` (rad), ``elongation`` (a/b), ``npix`` (unbinned
        px), ``sharp`` (True for cosmic-ray / hot-pixel like detections,
        narrower than the PSF), ``saturated``, ``isolated``.
    background_rms : float
        Sky noise per unbinned pixel (data units).
    fwhm_px : float
        The frame's FWHM (unbinned px): median over isolated, unsaturated,
        round, bright sources; NaN when none qualifies.
    """
    data = np.asarray(data)
    b = auto_binning(data.shape) if binning is None else int(binning)
    img = _bin_sum(data.astype(np.float32, copy=False), b)
    bmask = None if mask is None else _bin_mask(mask, b)
    # Background meshes of 64 binned px (256 unbinned on full frames) are >= 8 FWHM:
    # stars barely bias the mesh medians while vignetting is still followed.
    mesh = int(min(64, max(16, min(img.shape) // 6)))
    bkg = sep.Background(img, mask=bmask, bw=mesh, bh=mesh, fw=3, fh=3)
    sub = img - bkg.back()
    rms_binned = float(bkg.globalrms)
    # First pass with a small kernel, only to measure the PSF width; the second pass
    # uses a Gaussian matched to it, which also damps single-pixel cosmic rays.
    first = _extract(sub, 10.0, err=rms_binned, mask=bmask, minarea=3,
                     filter_kernel=_gaussian_kernel(2.0), deblend_cont=0.005)
    # A star is at least ~3 (binned) px wide; cosmic rays and hot pixels have b < 0.6.
    stars = first[(first["flag"] == 0) & (first["b"] > 0.8)] if len(first) else first
    if len(stars) >= _MIN_PSF_STARS:
        sel = stars[np.argsort(-stars["flux"])[:30]]
        # Gaussian-equivalent FWHM from isophotal moments underestimates a bit; it
        # only sets the filter width, so a rough value is enough.
        fwhm_b = float(np.clip(np.median(2.3548 * np.sqrt(sel["a"] * sel["b"])), 1.5, 12.0))
        kernel = _gaussian_kernel(fwhm_b)
        objs = _extract(sub, detect_sigma, err=rms_binned, mask=bmask,
                        minarea=max(3, int(0.5 * fwhm_b**2)),
                        filter_kernel=kernel, deblend_cont=0.005)
        n_star = int(np.count_nonzero(objs["b"] >= max(0.45, 0.2 * fwhm_b))) if len(objs) else 0
        if n_star < _DEEP_BELOW:
            knorm = float(np.sqrt(np.sum(kernel.astype(float) ** 2)))
            deep = _extract(sub, _DEEP_SNR, err=rms_binned * knorm, mask=bmask, minarea=3,
                            filter_kernel=kernel, deblend_cont=0.005)
            if len(deep) and np.count_nonzero(deep["b"] >= max(0.45, 0.2 * fwhm_b)) > n_star:
                objs = deep
    else:
        # No PSF to measure (clouds, a dome frame): a deep pass with a guessed kernel
        # would return noise and cosmic rays, so only the confident sources are kept.
        fwhm_b = 2.0
        objs = stars
    if len(objs):
        objs = objs[np.argsort(-objs["flux"])][:max_sources]
    n = len(objs)
    sig = max(fwhm_b / 2.3548, 0.5)
    if n:
        xw, yw, wflag = sep.winpos(sub, objs["x"], objs["y"], sig, mask=bmask)
        moved = np.hypot(xw - objs["x"], yw - objs["y"])
        # A windowed centroid that wanders off belongs to a blend: keep the isophotal one.
        bad_w = (wflag != 0) | ~np.isfinite(xw) | (moved > 2 * sig)
        xb = np.where(bad_w, objs["x"], xw)
        yb = np.where(bad_w, objs["y"], yw)
        flux, ferr, _f = sep.sum_circle(sub, xb, yb, 2.0 * fwhm_b, mask=bmask,
                                        err=rms_binned, subpix=1)
    else:
        xb = yb = flux = ferr = np.zeros(0)
    a = np.asarray(objs["a"], float) if n else np.zeros(0)
    bb = np.asarray(objs["b"], float) if n else np.zeros(0)
    # Cosmic rays and hot pixels are much narrower than any star: their moments are
    # those of one or two pixels.
    sharp = bb < max(0.45, 0.2 * fwhm_b)
    if n:
        # ... and far more concentrated: a star's peak holds ~0.7/FWHM^2 of its flux, a
        # hot pixel or a cosmic-ray hit most of it. (The moments of a faint detection
        # are those of its noisy footprint, so b alone lets single pixels through.)
        sharp |= np.asarray(objs["peak"], float) > np.maximum(
            _SHARP_CONCENTRATION / fwhm_b**2 * np.asarray(flux, float), 0.0)
    peak = (np.asarray(objs["peak"], float) / b**2) if n else np.zeros(0)
    saturated = np.zeros(n, bool)
    if saturation is not None and n:
        saturated = np.asarray(objs["peak"] + bkg.back()[objs["ycpeak"], objs["xcpeak"]],
                               float) / b**2 >= 0.9 * saturation
    # Isolated: no other star-like detection within 4 FWHM (the cosmic rays a deep pass
    # picks up do not make a neighbour).
    isolated = np.ones(n, bool)
    stars_xy = np.column_stack([xb, yb])[~sharp] if n else np.zeros((0, 2))
    if len(stars_xy) > 1:
        d, _ = cKDTree(stars_xy).query(np.column_stack([xb, yb]), k=2)
        # A star finds itself first; a sharp detection's nearest star is its neighbour.
        isolated = np.where(sharp, d[:, 0], d[:, 1]) > 4.0 * fwhm_b
    tab = Table()
    tab["x"] = b * np.asarray(xb, float) + (b - 1) / 2.0
    tab["y"] = b * np.asarray(yb, float) + (b - 1) / 2.0
    tab["flux"] = np.asarray(flux, float)
    tab["peak"] = peak
    tab["a"] = a * b
    tab["b"] = bb * b
    tab["theta"] = np.asarray(objs["theta"], float) if n else np.zeros(0)
    tab["elongation"] = np.where(bb > 0, a / np.maximum(bb, 1e-9), np.inf)
    # Centroid error of a background-limited star ~ sigma_psf / SNR (per axis); the
    # floor stands for what the noise model leaves out (pixel response, blends).
    snr = np.asarray(flux, float) / np.maximum(np.asarray(ferr, float), 1e-30)
    tab["pos_err"] = np.hypot(b * sig / np.maximum(snr, 1.0), 0.004 * b * sig)
    tab["npix"] = (np.asarray(objs["npix"], int) * b * b) if n else np.zeros(0, int)
    tab["sharp"] = sharp
    tab["saturated"] = saturated
    tab["isolated"] = isolated
    background_rms = rms_binned / b  # sum of b^2 pixels: noise grows as b
    # FWHM at full resolution on the brightest isolated round unsaturated stars.
    fwhm_px = float("nan")
    ok = isolated & ~sharp & ~saturated & (tab["elongation"] < 1.3) & (flux > 0)
    # The half-maximum area of a faint star (peak a few sigma) is noise: one pixel.
    bright = ok & (peak >= _FWHM_MIN_PEAK_SIGMA * background_rms)
    idx = np.flatnonzero(bright if np.count_nonzero(bright) >= 3 else ok)[:25]
    if len(idx):
        half = int(math.ceil(2.0 * fwhm_b * b))
        local_bkg = bkg.back()[np.clip(np.round(yb[idx]).astype(int), 0, img.shape[0] - 1),
                               np.clip(np.round(xb[idx]).astype(int), 0, img.shape[1] - 1)] / b**2
        fw = _halfmax_fwhm(np.asarray(data, np.float32), np.asarray(tab["x"][idx]),
                           np.asarray(tab["y"][idx]), local_bkg, half)
        fw = fw[np.isfinite(fw)]
        if len(fw):
            fwhm_px = float(np.median(fw))
    return tab, background_rms, fwhm_px


# ---------------------------------------------------------------------------
# The catalog-free part of the quality gate
# ---------------------------------------------------------------------------

def _usable(sources: Table) -> np.ndarray:
    """Rows that look like stars (finite position, not cosmic rays, not saturated)."""
    ok = np.isfinite(np.asarray(sources["x"], float)) & np.isfinite(np.asarray(sources["y"], float))
    for col in ("sharp", "saturated"):
        if col in sources.colnames:
            ok &= ~np.asarray(sources[col], bool)
    return ok


def doubled_fraction(sources: Table, *, tol_px: float, min_sep_px: float,
                     max_sources: int = 60) -> tuple[float, tuple[float, float]]:
    """Fraction of sources that have a companion at one common offset.

    A double exposure (the mount jumped mid-exposure) puts a copy of every
    star at the same offset; in a natural field no offset vector is shared by
    more than a couple of pairs.

    Parameters
    ----------
    sources : astropy.table.Table
        Detections with ``x``, ``y`` (px), brightest first.
    tol_px : float
        Two pair offsets closer than this (px) count as the same.
    min_sep_px : float
        Ignore pairs closer than this (px): deblended parts of one star.
    max_sources : int
        Use at most this many of the brightest sources.

    Returns
    -------
    fraction : float
        Sources in the most common offset cluster (both members counted)
        divided by the number of sources used.
    offset : (float, float)
        That offset (px).
    """
    use = sources[_usable(sources)][:max_sources]
    n = len(use)
    if n < 4:
        return 0.0, (0.0, 0.0)
    x, y = np.asarray(use["x"], float), np.asarray(use["y"], float)
    i, j = np.triu_indices(n, 1)
    dx, dy = x[j] - x[i], y[j] - y[i]
    # An offset and its opposite are the same companion relation.
    flip = (dx < 0) | ((dx == 0) & (dy < 0))
    dx, dy = np.where(flip, -dx, dx), np.where(flip, -dy, dy)
    far = np.hypot(dx, dy) > min_sep_px
    if not far.any():
        return 0.0, (0.0, 0.0)
    off = np.column_stack([dx[far], dy[far]])
    tree = cKDTree(off)
    counts = np.array([len(c) for c in tree.query_ball_point(off, tol_px)])
    best = int(np.argmax(counts))
    members = tree.query_ball_point(off[best], tol_px)
    ii, jj = i[far][members], j[far][members]
    fraction = len(set(ii.tolist()) | set(jj.tolist())) / n
    return float(fraction), (float(off[best, 0]), float(off[best, 1]))


def check_sources(sources: Table, fwhm_px: float, cfg: AstrometryConfig) -> None:
    """Reject frames whose detections alone show they are unusable.

    Raises
    ------
    BadFit
        ``too_few_sources`` (clouds, closed dome), ``double_exposure`` (a copy
        of the field at one offset), ``elongated`` (trailing, wind shake).
    """
    ok = _usable(sources)
    n = int(np.count_nonzero(ok))
    if n < cfg.min_sources:
        raise BadFit("too_few_sources",
                     f"{n} star-like sources (need {cfg.min_sources}): clouds or a closed dome?")
    fw = fwhm_px if np.isfinite(fwhm_px) and fwhm_px > 0 else 3.0
    frac, off = doubled_fraction(sources, tol_px=max(1.5, 0.15 * fw), min_sep_px=2.0 * fw)
    if frac >= cfg.max_doubled_fraction and n >= 6:
        raise BadFit("double_exposure",
                     f"{frac:.0%} of {n} sources have a companion at offset "
                     f"({off[0]:.1f}, {off[1]:.1f}) px: a double exposure")
    elong = float(np.median(np.asarray(sources["elongation"])[ok][:50]))
    if elong > cfg.max_elongation:
        raise BadFit("elongated",
                     f"median elongation {elong:.2f} > {cfg.max_elongation}: trailed images")


# ---------------------------------------------------------------------------
# Matching: triangle invariants voted into a similarity transform
# ---------------------------------------------------------------------------

def _triangles(xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each point with pairs of its ``k`` nearest neighbours.

    Returns the vertex indices ordered canonically (opposite the longest,
    middle and shortest side) and the invariants (middle/longest,
    shortest/longest side, orientation sign).
    """
    n = len(xy)
    if n < 3:
        return np.zeros((0, 3), int), np.zeros((0, 3))
    kk = min(k + 1, n)
    _, nb = cKDTree(xy).query(xy, kk)
    tri = set()
    for p in range(n):
        neigh = nb[p, 1:]
        for a in range(len(neigh)):
            for b in range(a + 1, len(neigh)):
                tri.add(tuple(sorted((p, int(neigh[a]), int(neigh[b])))))
    t = np.array(sorted(tri), int)
    p0, p1, p2 = xy[t[:, 0]], xy[t[:, 1]], xy[t[:, 2]]
    # Side opposite each vertex.
    sides = np.column_stack([np.hypot(*(p1 - p2).T), np.hypot(*(p0 - p2).T),
                             np.hypot(*(p0 - p1).T)])
    order = np.argsort(-sides, axis=1)
    t = np.take_along_axis(t, order, axis=1)
    s = np.take_along_axis(sides, order, axis=1)
    valid = s[:, 2] > 0
    t, s = t[valid], s[valid]
    a, b, c = xy[t[:, 0]], xy[t[:, 1]], xy[t[:, 2]]
    cross = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    inv = np.column_stack([s[:, 1] / s[:, 0], s[:, 2] / s[:, 0], np.sign(cross)])
    return t, inv


def _similarity(src: np.ndarray, dst: np.ndarray) -> tuple[complex, complex]:
    """Least-squares similarity dst = m * src + t in complex form (m = scale e^{i rot})."""
    zs = src[..., 0] + 1j * src[..., 1]
    zd = dst[..., 0] + 1j * dst[..., 1]
    ms, md = zs.mean(axis=-1, keepdims=True), zd.mean(axis=-1, keepdims=True)
    a, b = zs - ms, zd - md
    m = (np.conj(a) * b).sum(axis=-1) / (np.abs(a) ** 2).sum(axis=-1)
    t = md[..., 0] - m * ms[..., 0]
    return m, t


def match_points(src: np.ndarray, dst: np.ndarray, *, max_rotation_deg: float,
                 scale_tolerance: float, radius_px: float, k: int = 6,
                 inv_tol: float = 0.015) -> tuple[complex, complex, int]:
    """Find the similarity transform mapping ``src`` points onto ``dst`` points.

    Triangles of nearest neighbours in both lists are paired by their shape
    invariants; each pair proposes a similarity transform; proposals with a
    plausible rotation and scale vote, and the transform that puts most
    ``src`` points within ``radius_px`` of a ``dst`` point wins.

    Parameters
    ----------
    src, dst : numpy.ndarray, shape (n, 2)
        Point lists (px), brightest first; they need only partly overlap.
    max_rotation_deg : float
        Largest rotation accepted (degrees).
    scale_tolerance : float
        Largest fractional scale change accepted.
    radius_px : float
        A transformed ``src`` point within this of a ``dst`` point is an inlier.

    Returns
    -------
    m, t : complex
        The transform ``z_dst = m * z_src + t`` with ``z = x + i y``.
    n_inliers : int
        Number of ``src`` points it maps onto ``dst`` points.
    """
    ts, inv_s = _triangles(src, k)
    td, inv_d = _triangles(dst, k)
    if len(ts) == 0 or len(td) == 0:
        return 1 + 0j, 0j, 0
    tree = cKDTree(inv_d[:, :2])
    pairs = tree.query_ball_point(inv_s[:, :2], inv_tol)
    ii = np.fromiter((i for i, p in enumerate(pairs) for _ in p), int)
    jj = np.fromiter((j for p in pairs for j in p), int)
    if len(ii) == 0:
        return 1 + 0j, 0j, 0
    same = inv_s[ii, 2] == inv_d[jj, 2]  # no mirror image: parity is known
    ii, jj = ii[same], jj[same]
    m, t = _similarity(src[ts[ii]], dst[td[jj]])
    rot = np.degrees(np.angle(m))
    ok = (np.abs(rot) <= max_rotation_deg) & (np.abs(np.abs(m) - 1) <= scale_tolerance)
    m, t = m[ok], t[ok]
    if len(m) == 0:
        return 1 + 0j, 0j, 0
    # Proposals agreeing on where the frame centre lands vote for one another.
    centre = complex(*src.mean(axis=0))
    land = m * centre + t
    land_xy = np.column_stack([land.real, land.imag])
    votes = np.array([len(v) for v in cKDTree(land_xy).query_ball_point(land_xy, radius_px)])
    dtree = cKDTree(dst)
    zsrc = src[:, 0] + 1j * src[:, 1]
    best = (1 + 0j, 0j, 0)
    # Score the most-voted proposals by inliers over the whole point lists.
    for h in np.argsort(-votes)[:20]:
        z = m[h] * zsrc + t[h]
        d, _ = dtree.query(np.column_stack([z.real, z.imag]))
        n_in = int(np.count_nonzero(d < radius_px))
        if n_in > best[2]:
            best = (complex(m[h]), complex(t[h]), n_in)
    return best


def _pair_nearest(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between point lists closer than ``radius``."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    da, ia = cKDTree(b).query(a)
    _, ib = cKDTree(a).query(b)
    ok = (da < radius) & (ib[ia] == np.arange(len(a)))
    return np.flatnonzero(ok), ia[ok]


def wcs_scale_arcsec(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS (arcsec/px)."""
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)


def wcs_rotation_deg(wcs: WCS) -> float:
    """Position angle of the +y pixel axis, east of north (degrees)."""
    cd = wcs.celestial.pixel_scale_matrix
    # With east left the +y axis points to PA atan2(CD1_2, CD2_2) (simulator convention:
    # CD = [[-s cos, s sin], [s sin, s cos]]).
    return float(np.degrees(np.arctan2(cd[0, 1], cd[1, 1])))


def _gnomonic(ra_deg: np.ndarray, dec_deg: np.ndarray, ra0_deg: float,
              dec0_deg: float) -> np.ndarray:
    """Standard coordinates (xi east, eta north; degrees) about a tangent point."""
    a, d = np.radians(ra_deg), np.radians(dec_deg)
    a0, d0 = math.radians(ra0_deg), math.radians(dec0_deg)
    cosc = np.sin(d) * math.sin(d0) + np.cos(d) * math.cos(d0) * np.cos(a - a0)
    xi = np.cos(d) * np.sin(a - a0) / cosc
    eta = (np.sin(d) * math.cos(d0) - np.cos(d) * math.sin(d0) * np.cos(a - a0)) / cosc
    return np.degrees(np.column_stack([xi, eta]))


def _fit_tan(xy: np.ndarray, ra: np.ndarray, dec: np.ndarray, weight: np.ndarray,
             crpix0: tuple[float, float], crval: tuple[float, float]) -> WCS:
    """Weighted linear TAN fit: CD matrix and tangent point, CRPIX fixed.

    TAN is linear in the standard coordinates once the tangent point is
    known, so a weighted least-squares solve plus two updates of the tangent
    point is exact and much faster than a non-linear fit.
    """
    p = xy - np.asarray(crpix0)[None, :]
    sw = np.sqrt(weight)[:, None]
    ra0, dec0 = crval
    for _ in range(3):
        std = _gnomonic(ra, dec, ra0, dec0)
        a = np.column_stack([p, np.ones(len(p))])
        coef, *_ = np.linalg.lstsq(a * sw, std * sw, rcond=None)
        cd = coef[:2].T
        xi0, eta0 = coef[2]
        # Move the tangent point to where CRPIX lands, then refit.
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra0, dec0]
        w.wcs.crpix = [1.0, 1.0]
        w.wcs.cd = np.eye(2)
        r0, d0 = w.wcs_pix2world([[xi0, eta0]], 0)[0]  # intermediate degrees -> sky
        ra0, dec0 = float(r0), float(d0)
    out = WCS(naxis=2)
    out.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    out.wcs.crval = [ra0, dec0]
    out.wcs.crpix = [crpix0[0] + 1.0, crpix0[1] + 1.0]  # FITS pixels are 1-based
    out.wcs.cd = cd
    out.wcs.radesys = "ICRS"
    out.wcs.equinox = 2000.0
    out.wcs.set()
    return out


def _fit_clipped(xy: np.ndarray, sky: SkyCoord, pos_err: np.ndarray, *, shape: tuple[int, int],
                 crval: tuple[float, float], sip_degree: int, clip_sigma: float = 3.0,
                 min_keep: int = 4) -> tuple[WCS, np.ndarray, np.ndarray]:
    """Weighted TAN fit with iterative outlier clipping.

    Stars are weighted by their centroid error: on a frame with 20 stars the
    faint ones are ten times noisier than the bright ones.

    Returns (wcs, kept mask, residuals in px).
    """
    keep = np.ones(len(xy), bool)
    ra, dec = sky.ra.deg, sky.dec.deg
    weight = 1.0 / np.maximum(pos_err, 1e-3) ** 2
    centre = ((shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0)
    for _ in range(5):
        if sip_degree >= 2 and np.count_nonzero(keep) >= 4 * (sip_degree + 1) ** 2:
            w = fit_wcs_from_points((xy[keep, 0], xy[keep, 1]), sky[keep], projection="TAN",
                                    sip_degree=sip_degree)
        else:
            w = _fit_tan(xy[keep], ra[keep], dec[keep], weight[keep], centre, crval)
        px = np.column_stack(w.all_world2pix(ra, dec, 0))
        res = px - xy
        chi = np.hypot(res[:, 0], res[:, 1]) / np.maximum(pos_err, 1e-3)
        # Robust spread of the normalised residuals (a 2-d Rayleigh median is 1.18 sigma):
        # a blend or a saturated star must not widen the cut.
        scale = max(np.median(chi[keep]) / 1.1774, 1.0)
        new = chi < clip_sigma * scale
        if np.count_nonzero(new) < min_keep or np.array_equal(new, keep):
            break
        keep = new
    return w, keep, res


def _pos_err(sources: Table, fwhm_px: float) -> np.ndarray:
    """Centroid errors (px); equal weights when the detector gave none."""
    fallback = max(0.05 * fwhm_px, 0.01)
    if "pos_err" in sources.colnames:
        e = np.asarray(sources["pos_err"], float)
        # An unknown error (NaN) weighs the star as a poor one, not as NaN.
        return np.where(np.isfinite(e) & (e > 0), e, 5.0 * fallback)
    return np.full(len(sources), fallback)


def _centre_world(wcs: WCS, shape: tuple[int, int]) -> tuple[float, float]:
    ra, dec = wcs.all_pix2world([[(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0]], 0)[0]
    return float(ra), float(dec)


def _solution(wcs: WCS, guess: WCS | None, shape: tuple[int, int], src_idx: np.ndarray,
              cat_idx: np.ndarray, xy: np.ndarray, sky: SkyCoord, res: np.ndarray,
              relative: bool) -> Solution:
    scale = wcs_scale_arcsec(wcs)
    rms_px = float(np.sqrt(np.mean(np.sum(res**2, axis=1)))) if len(res) else float("nan")
    offset = 0.0
    if guess is not None:
        cy, cx = (shape[0] - 1) / 2.0, (shape[1] - 1) / 2.0
        offset = float(guess.pixel_to_world(cx, cy).separation(
            wcs.pixel_to_world(cx, cy)).arcsec)
    matches = Table()
    matches["source"] = src_idx
    matches["catalog"] = cat_idx
    matches["x"] = xy[:, 0]
    matches["y"] = xy[:, 1]
    matches["ra"] = sky.ra.deg
    matches["dec"] = sky.dec.deg
    matches["dx"] = res[:, 0]
    matches["dy"] = res[:, 1]
    return Solution(wcs=wcs, n_matches=len(src_idx), rms_arcsec=rms_px * scale,
                    scale_arcsec=scale, rotation_deg=wcs_rotation_deg(wcs),
                    offset_arcsec=offset, matches=matches, relative=relative)


def _match_and_fit(src_xy: np.ndarray, pos_err: np.ndarray, ref_xy: np.ndarray,
                   ref_sky: SkyCoord, *, shape: tuple[int, int], crval: tuple[float, float],
                   fwhm_px: float, cfg: AstrometryConfig, n_bright: int = 40
                   ) -> tuple[WCS, np.ndarray, np.ndarray, np.ndarray] | None:
    """Match detections to reference positions (px in a guess frame) and fit a WCS.

    Returns (wcs, source rows, reference rows, residuals px) of the final
    clipped match, or None when no transform is found.
    """
    radius = max(3.0, 1.0 * fwhm_px)
    m, t, n_in = match_points(src_xy[:n_bright], ref_xy[:cfg.max_catalog_stars],
                              max_rotation_deg=cfg.max_rotation_deg,
                              scale_tolerance=cfg.scale_tolerance, radius_px=radius)
    if n_in < 3:
        return None
    # Refine: affine transform from nearest neighbours, with a shrinking radius.
    zsrc = src_xy[:, 0] + 1j * src_xy[:, 1]
    z = m * zsrc + t
    pred = np.column_stack([z.real, z.imag])
    for r in (radius, 0.5 * radius, 0.5 * radius):
        si, ri = _pair_nearest(pred, ref_xy, r)
        if len(si) < 3:
            return None
        a = np.column_stack([src_xy[si], np.ones(len(si))])
        coef, *_ = np.linalg.lstsq(a, ref_xy[ri], rcond=None)
        pred = np.column_stack([src_xy, np.ones(len(src_xy))]) @ coef
    if len(si) < 4:
        return None
    wcs, keep, _ = _fit_clipped(src_xy[si], ref_sky[ri], pos_err[si], shape=shape,
                                crval=crval, sip_degree=0)
    # Final pass: every catalog star the fitted WCS puts near a detection.
    ref_px = np.column_stack(wcs.world_to_pixel(ref_sky))
    si, ri = _pair_nearest(src_xy, ref_px, _final_radius(fwhm_px))
    if len(si) < 4:
        return None
    crval = (float(wcs.wcs.crval[0]), float(wcs.wcs.crval[1]))
    wcs, keep, res = _fit_clipped(src_xy[si], ref_sky[ri], pos_err[si], shape=shape,
                                  crval=crval, sip_degree=cfg.sip_degree)
    return wcs, si[keep], ri[keep], res[keep]


def solve(sources: Table, catalog: Table, *, guess: WCS, shape: tuple[int, int],
          cfg: AstrometryConfig, fwhm_px: float | None = None,
          mag_column: str | None = None) -> Solution:
    """Fit the WCS of a frame by matching its sources to the reference catalog.

    Parameters
    ----------
    sources : astropy.table.Table
        Output of :func:`detect_sources` (``x``, ``y`` px; brightest first).
    catalog : astropy.table.Table
        Reference stars with ``ra``, ``dec`` (deg, at the observation epoch) and
        a magnitude column to rank them.
    guess : astropy.wcs.WCS
        WCS from the header: the log's pointing with the configured scale and
        rotation. It may be off by ``cfg.max_offset_arcmin``, by
        ``cfg.max_rotation_deg`` and by ``cfg.scale_tolerance``.
    shape : (int, int)
        Frame shape (ny, nx) in px.
    cfg : AstrometryConfig
        Tolerances and the quality gate.
    fwhm_px : float, optional
        The frame's FWHM (px); sets match radii. Default: from the sources' size.
    mag_column : str, optional
        Catalog column ranking stars by brightness (default: ``r``, else
        ``G``, ``g``, ``i``, else catalog order).

    Returns
    -------
    Solution

    Raises
    ------
    BadFit
        With reasons ``too_few_sources``, ``double_exposure``, ``elongated``,
        ``too_few_matches``, ``high_residual``, ``bad_scale``, ``large_offset``.
    """
    if fwhm_px is None or not np.isfinite(fwhm_px):
        ab = np.sqrt(np.asarray(sources["a"]) * np.asarray(sources["b"]))[_usable(sources)]
        fwhm_px = float(2.3548 * np.median(ab)) if len(ab) else 3.0
    check_sources(sources, fwhm_px, cfg)
    src = sources[_usable(sources)]
    src_rows = np.flatnonzero(_usable(sources))
    src_xy = np.column_stack([np.asarray(src["x"], float), np.asarray(src["y"], float)])

    ny, nx = shape
    guess_scale = wcs_scale_arcsec(guess)
    margin = cfg.max_offset_arcmin * 60.0 / guess_scale
    cra, cdec = np.asarray(catalog["ra"], float), np.asarray(catalog["dec"], float)
    good = np.isfinite(cra) & np.isfinite(cdec)
    cx, cy = guess.all_world2pix(np.where(good, cra, 0), np.where(good, cdec, 0), 0)
    near = good & (cx > -margin) & (cx < nx + margin) & (cy > -margin) & (cy < ny + margin)
    if mag_column is None:
        mag_column = next((c for c in ("r", "G", "g", "i") if c in catalog.colnames), None)
    rows = np.flatnonzero(near)
    if mag_column is not None:
        mag = np.ma.filled(np.ma.asarray(catalog[mag_column], float)[rows], np.inf)
        mag = np.where(np.isfinite(mag), mag, np.inf)
        rows = rows[np.argsort(mag, kind="stable")]
    if len(rows) < cfg.min_matches:
        raise BadFit("too_few_matches",
                     f"only {len(rows)} catalog stars within {cfg.max_offset_arcmin}' of the "
                     f"frame: wrong field or catalog too shallow")
    ref_xy = np.column_stack([cx[rows], cy[rows]])
    ref_sky = SkyCoord(cra[rows] * u.deg, cdec[rows] * u.deg)
    pos_err = _pos_err(src, fwhm_px)
    fit = _safe_match_and_fit(src_xy, pos_err, ref_xy, ref_sky, shape=shape,
                              crval=_centre_world(guess, shape), fwhm_px=fwhm_px, cfg=cfg)
    if fit is None or len(fit[1]) < cfg.min_matches:
        n = 0 if fit is None else len(fit[1])
        hint = ""
        if n < cfg.min_matches:
            hint = _scale_hint(src_xy, pos_err, cra[rows], cdec[rows], guess=guess, shape=shape,
                               fwhm_px=fwhm_px, cfg=cfg)
        raise BadFit("too_few_matches",
                     f"{n} of {len(src)} sources matched {len(rows)} catalog stars "
                     f"(need astrometry.min_matches = {cfg.min_matches}){hint}")
    wcs, si, ri, res = fit
    sol = _solution(wcs, guess, shape, src_rows[si], rows[ri], src_xy[si], ref_sky[ri], res,
                    relative=False)
    _gate(sol, guess, cfg, fwhm_px=fwhm_px, xy=src_xy[si], pos_err=pos_err[si], shape=shape)
    _check_verified(sol, wcs, src_xy, ref_sky, shape=shape, fwhm_px=fwhm_px,
                    radius_px=_final_radius(fwhm_px))
    return sol


#: Scale factors tried when nothing matches at the configured scale: binning 1-5 the
#: header did not say, or a scale configured for another binning.
_SCALE_SEARCH = (2.0, 0.5, 3.0, 1 / 3, 4.0, 0.25, 5.0, 0.2)


def _scale_hint(src_xy: np.ndarray, pos_err: np.ndarray, ra: np.ndarray, dec: np.ndarray, *,
                guess: WCS, shape: tuple[int, int], fwhm_px: float,
                cfg: AstrometryConfig) -> str:
    """What to tell the user when nothing matched: the scale or binning may be wrong.

    Tries the match again with the guess's scale multiplied by a few binning
    factors; when one of them solves and verifies, the message names the scale
    found. The frame is rejected all the same: a scale that is not the
    configured one is a configuration error, not a solution.
    """
    base = (f": if the field is right, the pixel scale or binning may be wrong "
            f"(detector.pixel_scale_arcsec x the binning from detector.binning_keys gives "
            f"{wcs_scale_arcsec(guess):.4f}\"/px)")
    ny, nx = shape
    for f in _SCALE_SEARCH:
        g = guess.deepcopy()
        g.wcs.cd = np.asarray(guess.wcs.cd if guess.wcs.has_cd() else
                              guess.wcs.get_pc() * guess.wcs.cdelt[:, None]) * f
        g.wcs.set()
        margin = cfg.max_offset_arcmin * 60.0 / wcs_scale_arcsec(g)
        x, y = g.all_world2pix(ra, dec, 0)
        near = (x > -margin) & (x < nx + margin) & (y > -margin) & (y < ny + margin)
        if np.count_nonzero(near) < cfg.min_matches:
            continue
        sky = SkyCoord(ra[near] * u.deg, dec[near] * u.deg)
        fit = _safe_match_and_fit(src_xy, pos_err, np.column_stack([x[near], y[near]]), sky,
                                  shape=shape, crval=_centre_world(g, shape), fwhm_px=fwhm_px,
                                  cfg=cfg)
        if fit is None or len(fit[1]) < max(cfg.min_matches, 8):
            continue
        try:
            sol = _solution(fit[0], g, shape, fit[1], fit[2], src_xy[fit[1]], sky[fit[2]],
                            fit[3], relative=False)
            _gate(sol, g, cfg, fwhm_px=fwhm_px, xy=src_xy[fit[1]], pos_err=pos_err[fit[1]],
                  shape=shape)
            _check_verified(sol, fit[0], src_xy, sky, shape=shape, fwhm_px=fwhm_px,
                            radius_px=_final_radius(fwhm_px))
        except BadFit:
            continue
        return (f"{base}; the frame matches {sol.n_matches} stars at {sol.scale_arcsec:.4f}\"/px "
                f"({sol.scale_arcsec / wcs_scale_arcsec(guess):.2f} x the configured scale): "
                f"set detector.pixel_scale_arcsec or detector.binning_keys")
    return base


def _final_radius(fwhm_px: float) -> float:
    """Radius (px) within which a catalog star the fitted WCS predicts is paired."""
    return max(2.0, 0.25 * fwhm_px)


def _safe_match_and_fit(src_xy: np.ndarray, pos_err: np.ndarray, ref_xy: np.ndarray,
                        ref_sky: SkyCoord, **kw: Any
                        ) -> tuple[WCS, np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`_match_and_fit` with numerical failures turned into ``BadFit("fit_failed")``.

    Non-finite positions are dropped first (a NaN centroid from a masked star);
    an SVD that does not converge, a singular system or a non-finite WCS is a
    fit that failed, never an exception reaching the frame's state.
    """
    ok_src = np.all(np.isfinite(src_xy), axis=1) & np.isfinite(pos_err)
    ok_ref = np.all(np.isfinite(ref_xy), axis=1)
    if not ok_src.all() or not ok_ref.all():
        keep_s, keep_r = np.flatnonzero(ok_src), np.flatnonzero(ok_ref)
        fit = _safe_match_and_fit(src_xy[keep_s], pos_err[keep_s], ref_xy[keep_r],
                                  ref_sky[keep_r], **kw)
        if fit is None:
            return None
        return fit[0], keep_s[fit[1]], keep_r[fit[2]], fit[3]
    try:
        with np.errstate(all="ignore"):
            fit = _match_and_fit(src_xy, pos_err, ref_xy, ref_sky, **kw)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError) as exc:
        raise BadFit("fit_failed", f"the WCS fit failed numerically ({type(exc).__name__}: "
                     f"{exc}) on {len(src_xy)} sources and {len(ref_xy)} catalog stars") from exc
    if fit is not None:
        w = fit[0].wcs
        if not (np.all(np.isfinite(w.crval)) and np.all(np.isfinite(w.cd))
                and np.all(np.isfinite(fit[3]))):
            raise BadFit("fit_failed", f"the WCS fit gave non-finite values from {len(fit[1])} "
                         f"matches (degenerate positions)")
    return fit


# The quality gate's fixed limits (see _gate and _verify for why these values).
#: Residual RMS (px) above this fraction of the FWHM: the pairs are not one star each.
_MAX_RMS_FWHM = 0.1
#: The fit's own 1-sigma position uncertainty anywhere on the frame, in FWHM.
_MAX_SIGMA_FWHM = 0.05
#: Largest difference of the x and y scales, and largest skew (fraction).
_MAX_SKEW = 0.02
#: Verification: the chance (log10, binomial tail) that as many of the brightest
#: catalog stars the WCS puts on the frame land on a detection by accident, less the
#: three pairs any affine fit can bring into coincidence, must be below this. The
#: matcher tries up to ~1e5 hypotheses (triangle pairs), hence well below 1e-5.
_MAX_VERIFY_LOG10_CHANCE = -8.0
#: Pairs an affine fit (6 parameters) makes coincide whatever the field.
_FREE_PAIRS = 3


def _gate(sol: Solution, guess: WCS, cfg: AstrometryConfig, *, fwhm_px: float,
          xy: np.ndarray, pos_err: np.ndarray, shape: tuple[int, int]) -> None:
    """Reject a fit that is not good enough or not consistent with the configuration."""
    guess_scale = wcs_scale_arcsec(guess)
    if sol.n_matches < cfg.min_matches:
        raise BadFit("too_few_matches", f"{sol.n_matches} matches (need "
                     f"astrometry.min_matches = {cfg.min_matches})")
    if not sol.rms_arcsec <= cfg.max_rms_arcsec:
        raise BadFit("high_residual", f"fit RMS {sol.rms_arcsec:.2f}\" > "
                     f"astrometry.max_rms_arcsec = {cfg.max_rms_arcsec}\" over "
                     f"{sol.n_matches} stars")
    rms_px = sol.rms_arcsec / sol.scale_arcsec
    if not rms_px <= _MAX_RMS_FWHM * fwhm_px:
        # Centroids are good to a few hundredths of the FWHM: residuals of a tenth of it
        # are pairs of different stars (a chance fit), not centroid errors.
        raise BadFit("high_residual", f"fit RMS {rms_px:.2f} px > {_MAX_RMS_FWHM} FWHM "
                     f"({_MAX_RMS_FWHM * fwhm_px:.2f} px) over {sol.n_matches} stars: residuals "
                     f"far beyond the centroid errors (median {np.median(pos_err):.3f} px)")
    if abs(sol.scale_arcsec / guess_scale - 1) > cfg.scale_tolerance:
        raise BadFit("bad_scale", f"fitted scale {sol.scale_arcsec:.4f}\"/px is more than "
                     f"astrometry.scale_tolerance = {cfg.scale_tolerance:.0%} from the expected "
                     f"{guess_scale:.4f}\"/px (detector.pixel_scale_arcsec x binning)")
    sx, sy = proj_plane_pixel_scales(sol.wcs.celestial)
    cd = sol.wcs.celestial.pixel_scale_matrix
    skew = abs(float(np.dot(cd[:, 0], cd[:, 1]))) / float(sx * sy)
    if abs(sx / sy - 1) > _MAX_SKEW or skew > _MAX_SKEW:
        raise BadFit("bad_scale", f"fitted x/y scales differ by {abs(sx / sy - 1):.1%} and "
                     f"the axes are skewed by {skew:.1%} (limit {_MAX_SKEW:.0%}): not a camera")
    if np.sign(np.linalg.det(cd)) != np.sign(np.linalg.det(guess.celestial.pixel_scale_matrix)):
        raise BadFit("bad_scale", "fitted WCS is mirrored against the header's "
                     "(detector.parity)")
    drot = (sol.rotation_deg - wcs_rotation_deg(guess) + 180.0) % 360.0 - 180.0
    if abs(drot) > cfg.max_rotation_deg:
        raise BadFit("bad_rotation", f"fitted rotation is {drot:+.2f} deg from the header's "
                     f"(limit astrometry.max_rotation_deg = {cfg.max_rotation_deg})")
    if sol.offset_arcsec > cfg.max_offset_arcmin * 60.0:
        raise BadFit("large_offset", f"pointing off by {sol.offset_arcsec / 60:.1f}' > "
                     f"astrometry.max_offset_arcmin = {cfg.max_offset_arcmin}'")
    sigma = _fit_sigma_px(xy, np.column_stack([sol.matches["dx"], sol.matches["dy"]]),
                          pos_err, shape)
    if not sigma <= _MAX_SIGMA_FWHM * fwhm_px:
        # A few stars bunched in one part of the frame fix it there and nowhere else.
        raise BadFit("unverified", f"the fit from {sol.n_matches} stars is uncertain by up to "
                     f"{sigma:.2f} px on the frame (> {_MAX_SIGMA_FWHM} FWHM = "
                     f"{_MAX_SIGMA_FWHM * fwhm_px:.2f} px): too few or too bunched stars")


def _fit_sigma_px(xy: np.ndarray, res: np.ndarray, pos_err: np.ndarray,
                  shape: tuple[int, int]) -> float:
    """Largest 1-sigma position error of a linear fit over the frame's corners (px).

    The covariance of the weighted affine fit through ``xy`` (what the TAN fit
    is, locally), scaled by the observed scatter when that exceeds the centroid
    errors, propagated to the corners and the centre.
    """
    n = len(xy)
    if n < 4:
        return float("inf")
    w = 1.0 / np.maximum(pos_err, 1e-3) ** 2
    a = np.column_stack([xy, np.ones(n)])
    try:
        cov = np.linalg.inv(a.T @ (a * w[:, None]))
    except np.linalg.LinAlgError:
        return float("inf")
    chi2 = float(np.sum(w[:, None] * res**2)) / max(2 * n - 6, 1)
    ny, nx = shape
    pts = np.array([[0, 0, 1], [nx - 1, 0, 1], [0, ny - 1, 1], [nx - 1, ny - 1, 1],
                    [(nx - 1) / 2, (ny - 1) / 2, 1]], float)
    var = np.einsum("ij,jk,ik->i", pts, cov, pts) * max(chi2, 1.0)
    # Per axis -> radial (two axes).
    return float(np.sqrt(2.0 * np.max(var))) if np.all(np.isfinite(var)) else float("inf")


def _binom_log10_tail(k: int, n: int, p: float) -> float:
    """log10 P(X >= k) for X ~ Binomial(n, p)."""
    from scipy.stats import binom

    if k <= 0:
        return 0.0
    v = float(binom.logsf(k - 1, n, min(max(p, 1e-12), 1.0)))
    return v / math.log(10.0)


def _verify(wcs: WCS, src_xy: np.ndarray, ref_sky: SkyCoord, *, shape: tuple[int, int],
            fwhm_px: float, radius_px: float) -> tuple[int, int, float, float]:
    """Do the fit's predictions of the brightest catalog stars land on detections?

    As astrometry.net verifies a hypothesis: the brightest catalog stars the
    WCS puts on the frame (as many as there are detections, at least 10) are
    looked up among the detections; a right WCS puts a good fraction of them
    within ``radius_px`` of one, a wrong one only as many as chance allows
    (the detections' coverage of the frame).

    Returns (landed, predicted, chance probability per star, log10 binomial
    tail of landing that many by chance).
    """
    ny, nx = shape
    px = np.column_stack(wcs.world_to_pixel(ref_sky))
    edge = max(1.0, 0.5 * fwhm_px)
    inside = np.all(np.isfinite(px), axis=1) & (px[:, 0] > edge) & (px[:, 0] < nx - 1 - edge) \
        & (px[:, 1] > edge) & (px[:, 1] < ny - 1 - edge)
    pred = px[inside][:max(len(src_xy), 10)]  # ref_sky is brightest first
    if len(pred) == 0 or len(src_xy) == 0:
        return 0, len(pred), 1.0, 0.0
    d, _ = cKDTree(src_xy).query(pred)
    landed = int(np.count_nonzero(d < radius_px))
    chance = min(1.0, len(src_xy) * math.pi * radius_px**2 / float(nx * ny))
    return landed, len(pred), chance, _binom_log10_tail(landed - _FREE_PAIRS, len(pred), chance)


def _check_verified(sol: Solution, wcs: WCS, src_xy: np.ndarray, ref_sky: SkyCoord, *,
                    shape: tuple[int, int], fwhm_px: float, radius_px: float) -> None:
    landed, predicted, chance, log_p = _verify(wcs, src_xy, ref_sky, shape=shape,
                                               fwhm_px=fwhm_px, radius_px=radius_px)
    if not log_p <= _MAX_VERIFY_LOG10_CHANCE:
        raise BadFit("unverified", f"{landed} of the {predicted} brightest catalog stars the "
                     f"fit puts on the frame land on a detection; with {_FREE_PAIRS} any fit "
                     f"makes and {chance:.4f} per star by chance, that is 1 in 10^{-log_p:.1f} "
                     f"(need 10^{-_MAX_VERIFY_LOG10_CHANCE:.0f}): the {sol.n_matches} matches "
                     f"do not prove the fit")


def relative_solution(sources: Table, reference_sources: Table, reference_wcs: WCS, *,
                      shape: tuple[int, int], cfg: AstrometryConfig,
                      fwhm_px: float | None = None) -> Solution:
    """Register a frame to an earlier solved frame of the same field.

    The fallback when the catalog is unreachable: the reference frame's
    sources, placed on the sky by its WCS, stand in for the catalog.

    Parameters
    ----------
    sources : astropy.table.Table
        This frame's detections (``x``, ``y`` px).
    reference_sources : astropy.table.Table
        Detections of the reference frame (the night's first solved frame of
        the field, same band).
    reference_wcs : astropy.wcs.WCS
        The reference frame's fitted WCS.
    shape : (int, int)
        Frame shape (ny, nx) px.
    cfg : AstrometryConfig
        Tolerances and quality gate.
    fwhm_px : float, optional
        This frame's FWHM (px).

    Returns
    -------
    Solution
        With ``relative=True``; ``offset_arcsec`` is measured from the
        reference frame's pointing, ``matches["catalog"]`` holds rows of
        ``reference_sources``.
    """
    if fwhm_px is None or not np.isfinite(fwhm_px):
        ab = np.sqrt(np.asarray(sources["a"]) * np.asarray(sources["b"]))[_usable(sources)]
        fwhm_px = float(2.3548 * np.median(ab)) if len(ab) else 3.0
    check_sources(sources, fwhm_px, cfg)
    use = _usable(sources)
    src_rows = np.flatnonzero(use)
    src_xy = np.column_stack([np.asarray(sources["x"], float)[use],
                              np.asarray(sources["y"], float)[use]])
    ref_use = np.flatnonzero(_usable(reference_sources))
    ref_xy = np.column_stack([np.asarray(reference_sources["x"], float)[ref_use],
                              np.asarray(reference_sources["y"], float)[ref_use]])
    ref_sky = reference_wcs.pixel_to_world(ref_xy[:, 0], ref_xy[:, 1])
    pos_err = _pos_err(sources[use], fwhm_px)
    fit = _safe_match_and_fit(src_xy, pos_err, ref_xy, ref_sky, shape=shape,
                              crval=_centre_world(reference_wcs, shape), fwhm_px=fwhm_px,
                              cfg=cfg)
    if fit is None or len(fit[1]) < cfg.min_matches:
        n = 0 if fit is None else len(fit[1])
        raise BadFit("too_few_matches", f"{n} sources matched the reference frame's "
                     f"{len(ref_xy)} (need {cfg.min_matches})")
    wcs, si, ri, res = fit
    sol = _solution(wcs, reference_wcs, shape, src_rows[si], ref_use[ri], src_xy[si],
                    ref_sky[ri], res, relative=True)
    _gate(sol, reference_wcs, cfg, fwhm_px=fwhm_px, xy=src_xy[si], pos_err=pos_err[si],
          shape=shape)
    return sol
