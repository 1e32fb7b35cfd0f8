"""Cosmic-ray (and hot-pixel) hits on a calibrated frame: find them, repair them.

Numeric only: arrays in, arrays out. Two tests, because a hit on the sky and a
hit on a bright star's core look different:

1. :func:`find_hits`, the spike test (L.A.Cosmic's idea in one pass): a pixel
   standing far above the median of its 8 neighbours, by more than the frame's
   own stars' peaks do; hit pixels are replaced by that median;
2. :func:`bright_core_hits`, the point-mirror test: a PSF is point-symmetric,
   so a pixel of a bright star's core standing far above its mirror image
   through the star's centre is a hit however bright the star;
   :func:`mirror_repair` then replaces hits near a star by their mirror value.

:mod:`photd.photometry` flags every star whose aperture holds a hit.
"""

from __future__ import annotations

import math

import numpy as np

from photd.config import PhotometryConfig

# Stars at least this bright (S/N in a 1-FWHM aperture) get the mirror test:
# fainter cores are low enough for the spike test to see any hit that matters.
MIRROR_MIN_SNR = 50.0
# Below this FWHM (px) the interpolated mirror image of a clean core misses by
# more than the tolerance (about 2 false hits per bright star at 1.5-2 px).
MIRROR_MIN_FWHM_PX = 3.0


def find_hits(data: np.ndarray, bad: np.ndarray, rdnoise_e: float, x_px: np.ndarray,
              y_px: np.ndarray, fwhm_px: float, cfg: PhotometryConfig, *,
              inplace: bool = False,
              data32: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """Find cosmic-ray (and hot-pixel) hits: (hit mask, cleaned frame, star contrast).

    L.A.Cosmic's idea (van Dokkum 2001) in one pass: a hit is sharper than
    any star. For each pixel, ``excess`` is its height above the median of
    its eight neighbours and ``height`` the neighbours' height above the sky.
    A star's peak pixel has ``excess / height`` near a value set by the seeing
    and pixel size; we measure that ratio on the frame's own stars (median
    over their peak pixels), so a sharp PSF is never taken for a hit. A pixel
    is a hit when ``excess > cosmic_sigma * noise + cosmic_contrast * ratio *
    height``: on the sky that is a plain 5-sigma spike, on a star's core a
    spike the star's profile cannot make. On a binned frame a track rarely
    covers more than two pixels and the median of eight ignores one hit
    neighbour. Hit pixels are replaced by that median. About 25x cheaper than
    ``astroscrappy`` here; the tests check it against the simulator's hits.

    The result is exactly that of a full-frame 3x3 ring median filter, computed
    much faster: a pixel can only be a hit if it stands ``cosmic_sigma * noise``
    above a cheap lower bound of its neighbours' median (the larger of the minima
    of its 4 side and 4 corner neighbours), so the exact median is computed only
    for those few candidates. With ``inplace`` the hits are repaired in ``data``
    itself (which is then returned as the cleaned frame). ``data32``, a float32
    array holding the same values as ``data``, lets the full-frame passes run in
    float32 (half the memory traffic) with margins that keep the result exact.
    """
    any_bad = bool(bad.any())
    fill = fill32 = None
    if any_bad:
        src = data if data32 is None else data32
        finite = np.isfinite(src)
        fill = _median(src if finite.all() else src[finite])
        filled = np.where(bad, fill, data)
        if data32 is not None:
            fill32 = np.float32(fill)
    else:
        filled = data
    if data32 is None:
        sky = _median(filled)
    elif fill32 is None:
        sky = _median(data32)
    else:
        # The float32 copy orders every value as the float64 one does, except that the
        # rounded fill ties with data values equal to it: then the exact way.
        filled32 = np.where(bad, fill32, data32)
        sky = _median(filled32)
        if sky == float(fill32) or not np.isfinite(sky):
            sky = _median(filled)
    rd2 = rdnoise_e**2
    hits = np.zeros(data.shape, bool)
    if data32 is None:
        cand_r, cand_c = _spike_candidates(filled, rd2, cfg.cosmic_sigma)
    else:
        # Rounding the fill to float32 moves the neighbours' bound by at most |fill -
        # fill32|; float32 arithmetic errors are far below the relative margins.
        slack = 0.0 if fill32 is None else 2.0 * abs(fill - float(fill32))
        cand_r, cand_c = _spike_candidates(data32 if fill32 is None else filled32, rd2,
                                           cfg.cosmic_sigma, slack=slack, rel=1e-5)
    med_c = _ring_median(filled, cand_r, cand_c)
    ratios = []
    half = max(int(round(fwhm_px)), 2)
    ny, nx = data.shape
    peaks_r, peaks_c = [], []
    for xi, yi in zip(x_px, y_px, strict=True):
        ix, iy = int(round(xi)), int(round(yi))
        if not (half <= ix < nx - half and half <= iy < ny - half):
            continue
        box = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        if bad[box].any():
            continue
        k = np.unravel_index(int(np.argmax(filled[box])), filled[box].shape)
        peaks_r.append(iy - half + k[0])
        peaks_c.append(ix - half + k[1])
    if peaks_r:
        pr, pc = np.array(peaks_r), np.array(peaks_c)
        med_p = _ring_median(filled, pr, pc)
        f_p = filled[pr, pc]
        excess_p = f_p - med_p
        height_p = med_p - sky
        noise_p = np.sqrt(np.maximum(f_p, 0.0) + rd2)
        for e, h, nz in zip(excess_p, height_p, noise_p, strict=True):
            if h > 30 * nz:
                ratios.append(e / h)
    # Without bright stars to learn from, assume a well-sampled Moffat core.
    ratio = float(np.median(ratios)) if len(ratios) >= 3 else 0.4
    if len(cand_r):
        f_c = filled[cand_r, cand_c]
        excess = f_c - med_c
        noise = np.sqrt(np.maximum(f_c, 0.0) + rd2)
        height = med_c - sky
        hit = (excess > cfg.cosmic_sigma * noise
               + cfg.cosmic_contrast * max(ratio, 0.05) * np.maximum(height, 0.0)) \
            & ~bad[cand_r, cand_c]
        hits[cand_r[hit], cand_c[hit]] = True
    else:
        hit = np.zeros(0, bool)
    clean = data if inplace else data.copy()
    if len(cand_r):
        clean[cand_r[hit], cand_c[hit]] = med_c[hit]
    return hits, clean, ratio



_MEDIAN_SAMPLE = 100_000  # pixels sampled to bracket a frame's median


def _median(values: np.ndarray) -> float:
    """``np.median`` of an array without NaNs, exactly, in a few linear passes.

    A sample brackets the median; only the values inside the bracket are
    partitioned. Falls back to ``np.median`` if the bracket misses.
    """
    flat = np.ravel(values)
    n = flat.size
    if n < 4 * _MEDIAN_SAMPLE:
        return float(np.median(flat))
    sample = np.sort(flat[:: n // _MEDIAN_SAMPLE])
    m = sample.size
    q = int(5 * math.sqrt(m)) + 16  # ~10 sigma of the sample median's rank error
    lo, hi = sample[max(m // 2 - q, 0)], sample[min(m // 2 + q, m - 1)]
    k_lo, k_hi = (n - 1) // 2, n // 2
    below = int(np.count_nonzero(flat < lo))
    inside = flat[(flat >= lo) & (flat <= hi)]
    if not (below <= k_lo and below + inside.size > k_hi):
        return float(np.median(flat))
    part = np.partition(inside, [k_lo - below, k_hi - below])
    a, b = np.float64(part[k_lo - below]), np.float64(part[k_hi - below])
    return float(a) if k_lo == k_hi else float((a + b) / 2)


_RING = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _ring_median(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Median of the 8 neighbours of each (row, col), edges repeated.

    The same value as ``scipy.ndimage.median_filter(img, footprint=ring,
    mode="nearest")`` there: the 5th smallest of the 8 (rank 8 // 2).
    """
    ny, nx = img.shape
    vals = np.empty((len(rows), 8), dtype=img.dtype)
    for k, (dy, dx) in enumerate(_RING):
        vals[:, k] = img[np.clip(rows + dy, 0, ny - 1), np.clip(cols + dx, 0, nx - 1)]
    vals.sort(axis=1)
    return vals[:, 4].astype(float)


def _spike_candidates(img: np.ndarray, rd2: float, sigma: float, *, slack: float = 0.0,
                      rel: float = 0.0,
                      rows_per_block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Pixels that may stand ``sigma * noise`` above the median of their 8 neighbours.

    The median of the ring is its 5th smallest value. Each group of 4 (the
    side and the corner neighbours) holds at least one of the 5 smallest, so
    the larger of the two group minima is at most the median, and
    ``img - bound > sigma * noise`` keeps every true hit. Row blocks keep the
    work in cache. For a float32 ``img`` (``rel`` > 0) the test is loosened by
    ``slack`` plus ``1e-6`` of the block's largest value and by the factor
    ``1 - rel``, far more than float32 rounding can move it.
    """
    ny, nx = img.shape
    rows_out, cols_out = [], []
    for r0 in range(0, ny, rows_per_block):
        r1 = min(r0 + rows_per_block, ny)
        lo, hi = max(r0 - 1, 0), min(r1 + 1, ny)
        blk = np.empty((r1 - r0 + 2, nx + 2), dtype=img.dtype)
        top = 1 if r0 == 0 else 0
        blk[top:top + hi - lo, 1:-1] = img[lo:hi]
        if r0 == 0:
            blk[0, 1:-1] = img[0]
        if r1 == ny:
            blk[-1, 1:-1] = img[ny - 1]
        blk[:, 0] = blk[:, 1]
        blk[:, -1] = blk[:, -2]
        c = blk[1:-1, 1:-1]
        side = np.minimum(blk[:-2, 1:-1], blk[2:, 1:-1])
        np.minimum(side, blk[1:-1, :-2], out=side)
        np.minimum(side, blk[1:-1, 2:], out=side)
        corner = np.minimum(blk[:-2, :-2], blk[:-2, 2:])
        np.minimum(corner, blk[2:, :-2], out=corner)
        np.minimum(corner, blk[2:, 2:], out=corner)
        np.maximum(side, corner, out=side)
        np.subtract(c, side, out=side)  # an upper bound of the excess over the median
        noise = np.maximum(c, 0.0)
        noise += rd2
        np.sqrt(noise, out=noise)
        if rel:
            noise *= sigma * (1.0 - rel)
            side += slack + 1e-6 * max(float(blk.max()), -float(blk.min()))
        else:
            noise *= sigma
        rr, cc = np.nonzero(side > noise)
        rows_out.append(rr + r0)
        cols_out.append(cc)
    return np.concatenate(rows_out), np.concatenate(cols_out)


# --------------------------------------------------------------------------- the mirror test

def bright_core_hits(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                     snr: np.ndarray, centred: np.ndarray, radius_px: float, sky_e: np.ndarray,
                     rdnoise_e: float, fwhm_px: float,
                     cfg: PhotometryConfig) -> tuple[np.ndarray, np.ndarray]:
    """The point-mirror test (:func:`mirror_hits`) on the cores of the bright stars.

    On a bright star's core the spike test (:func:`find_hits`) needs a hit to
    outshine the star's own profile; a pixel standing far above its mirror image
    through the star's centre is a hit however bright the star. Stars with
    ``snr`` (in a 1-FWHM aperture) of at least ``MIRROR_MIN_SNR`` and a
    trustworthy centre (``centred``: a failed centroid is no centre to mirror
    about) are tested; below ``MIRROR_MIN_FWHM_PX`` bilinear interpolation of
    the core is too coarse and none is. Returns (rows, cols) of the hits.
    """
    bright = np.flatnonzero((snr >= MIRROR_MIN_SNR) & centred)
    if not len(bright) or fwhm_px < MIRROR_MIN_FWHM_PX:
        return np.zeros(0, int), np.zeros(0, int)
    return mirror_hits(img, bad, x_px, y_px, bright, radius_px, sky_e, rdnoise_e**2,
                       cfg.cosmic_sigma, fwhm_px, cfg.cosmic_mirror_tolerance)


def mirror_hits(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                which: np.ndarray, radius_px: float, sky_e: np.ndarray, rd2: float,
                sigma: float, fwhm_px: float, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of bright stars' cores standing far above their point-mirrored value.

    For star ``k`` in ``which``, every good pixel within ``radius_px`` of its
    centre is compared with the bilinear interpolation of ``img`` at the
    point reflected through the centre (:func:`_mirrored`). A hit when the
    excess exceeds ``sigma`` times the noise of the two (``rd2``: read noise
    squared, e-^2) plus ``tolerance`` times the mirror's height above
    ``sky_e[k]``. Pixels near another star (within 2 FWHM of it) are not
    judged: a neighbour is not point-symmetric about us. Returns (rows, cols)
    of the hits.
    """
    rows_out, cols_out = [], []
    for k in which:
        xs, ys = float(x_px[k]), float(y_px[k])
        sy, sx = pixel_box(img.shape, xs, ys, radius_px)
        py, px = np.mgrid[sy, sx]
        py, px = py.ravel(), px.ravel()
        ok = ((px - xs) ** 2 + (py - ys) ** 2 <= radius_px**2) & ~bad[py, px]
        near = np.flatnonzero((np.abs(x_px - xs) < radius_px + 2 * fwhm_px)
                              & (np.abs(y_px - ys) < radius_px + 2 * fwhm_px))
        for j in near:
            if j != k:
                for qx, qy in ((px, py), (2 * xs - px, 2 * ys - py)):
                    ok &= (qx - x_px[j]) ** 2 + (qy - y_px[j]) ** 2 > (2.0 * fwhm_px) ** 2
        py, px = py[ok], px[ok]
        mirror, usable = _mirrored(img, xs, ys, px, py, bad)
        v = img[py, px]
        noise = np.sqrt(np.maximum(v, 0.0) + np.maximum(mirror, 0.0) + 2 * rd2)
        hit = usable & (v - mirror > sigma * noise
                        + tolerance * np.maximum(mirror - sky_e[k], 0.0))
        rows_out.append(py[hit])
        cols_out.append(px[hit])
    if not rows_out:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(rows_out), np.concatenate(cols_out)


def mirror_repair(clean: np.ndarray, data: np.ndarray, hits: np.ndarray, bad: np.ndarray,
                  x_px: np.ndarray, y_px: np.ndarray, radius_px: float, *,
                  inplace: bool = False) -> np.ndarray:
    """Replace hit pixels within ``radius_px`` of a star by the point-mirrored value.

    Near a star's core the neighbours' median underestimates a hit pixel; its
    mirror image through the star's centre does not (a PSF is symmetric).
    The value at (2x - px, 2y - py) is bilinearly interpolated from ``data``;
    when any of the four pixels used is itself hit or bad the neighbours'
    median (already in ``clean``) stays. With ``inplace`` ``clean`` itself is
    repaired (only hit pixels are written; only pixels that are not hit are read).
    """
    if not hits.any():
        return clean
    out = clean if inplace else clean.copy()
    for xs, ys in zip(x_px, y_px, strict=True):
        sy, sx = pixel_box(hits.shape, xs, ys, radius_px)
        iy, ix = np.nonzero(hits[sy, sx])
        if not len(iy):
            continue
        py, px = iy + sy.start, ix + sx.start
        near = (px - xs) ** 2 + (py - ys) ** 2 <= radius_px**2
        py, px = py[near], px[near]
        values, usable = _mirrored(data, xs, ys, px, py, hits, bad)
        out[py[usable], px[usable]] = values[usable]
    return out


def _mirrored(img: np.ndarray, xs: float, ys: float, px: np.ndarray, py: np.ndarray,
              *masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value of ``img`` at the reflection of pixels (px, py) through (xs, ys).

    Bilinear interpolation of the four pixels around the mirror point.
    Returns (values, usable): not usable when the mirror point is off the
    frame or one of its four pixels is set in any of ``masks``.
    """
    ny, nx = img.shape
    mx, my = 2 * xs - px, 2 * ys - py
    x0, y0 = np.floor(mx).astype(int), np.floor(my).astype(int)
    usable = (x0 >= 0) & (y0 >= 0) & (x0 < nx - 1) & (y0 < ny - 1)
    x0, y0 = np.where(usable, x0, 0), np.where(usable, y0, 0)
    for m in masks:
        usable &= ~(m[y0, x0] | m[y0, x0 + 1] | m[y0 + 1, x0] | m[y0 + 1, x0 + 1])
    fx, fy = mx - x0, my - y0
    values = (img[y0, x0] * (1 - fx) * (1 - fy) + img[y0, x0 + 1] * fx * (1 - fy)
              + img[y0 + 1, x0] * (1 - fx) * fy + img[y0 + 1, x0 + 1] * fx * fy)
    return values, usable


def pixel_box(shape: tuple[int, int], x_px: float, y_px: float,
              half_px: float) -> tuple[slice, slice]:
    """(rows, cols) slices of the pixels within ``half_px`` of (x_px, y_px), clipped to
    a frame of ``shape``; empty when the box lies off the frame."""
    ny, nx = shape
    x0, x1 = max(int(math.floor(x_px - half_px)), 0), min(int(math.ceil(x_px + half_px)) + 1, nx)
    y0, y1 = max(int(math.floor(y_px - half_px)), 0), min(int(math.ceil(y_px + half_px)) + 1, ny)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))
