"""Aperture photometry of one calibrated frame: every catalog star and the target.

Numeric only: arrays and tables in, a table and a summary out; no file,
database or clock. The steps, in order (see :func:`measure_frame`):

1. positions: catalog RA/Dec through the frame's WCS, then a windowed
   (Gaussian-weighted, SExtractor ``XWIN``-like) centroid for stars bright
   enough to centroid well; fainter stars are measured at the WCS position
   shifted by the frame's median centroid offset (forced photometry), because
   a noisy centroid biases a small aperture's flux low;
2. cosmic rays: a one-pass L.A.Cosmic-like test finds hits; a hit pixel is
   replaced by the median of its neighbours and every star whose aperture
   holds one is flagged ``COSMIC`` (never silently biased);
3. local sky: sigma-clipped mean of an annulus (``annulus_*_fwhm``) with the
   cores of known neighbours masked;
4. curve of growth of bright, isolated, unsaturated stars out to
   ``growth_radius_fwhm``: the normalised growth curve gives the optimal
   aperture (maximum S/N for a sky-limited star, about 0.7 FWHM) and the
   aperture correction from it to the large radius, with its uncertainty;
5. fluxes at the optimal aperture, aperture-corrected, with errors from the
   CCD equation (source, sky, read noise, dark, digitisation) plus the error
   of the sky estimate and the star-to-star scatter of the aperture
   correction.

Units: the frame is in electrons (bias-subtracted, flat-fielded, times the
gain); ``gain_e_per_adu`` only enters the digitisation-noise term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy.stats import sigma_clip
from astropy.table import Table
from astropy.wcs import WCS
from photutils.aperture import CircularAperture

from photd.config import PhotometryConfig

# Bit flags of a measurement (combine with |; 0 = clean).
EDGE = 1  # the aperture crosses the frame edge
SATURATED = 2  # a masked (saturated or bad) pixel inside the aperture
NEIGHBOUR = 4  # neighbours put more than neighbour_max_contamination of light in the aperture
COSMIC = 8  # a cosmic-ray hit inside the aperture (pixels replaced, star flagged)
NO_CENTROID = 16  # bright enough to centroid, but the centroid failed or ran away
BAD_SKY = 32  # too few clean annulus pixels for a trustworthy sky
NONPOSITIVE = 64  # flux <= 0: no magnitude
OFF_FRAME = 128  # the target is not on this frame (row kept, values NaN)

FLAG_NAMES = {
    EDGE: "edge", SATURATED: "saturated", NEIGHBOUR: "neighbour", COSMIC: "cosmic",
    NO_CENTROID: "no_centroid", BAD_SKY: "bad_sky", NONPOSITIVE: "nonpositive",
    OFF_FRAME: "off_frame",
}

COLUMNS = ("star_id", "x_px", "y_px", "flux_e", "flux_err_e", "mag_inst", "mag_inst_err",
           "aperture_px", "aperture_fwhm", "apcorr_mag", "sky_e_per_px", "flags")

_MAG = 2.5 / math.log(10.0)  # 1.0857: d(mag) = _MAG * d(flux) / flux
_MAD_TO_STD = 1.482602218505602  # astropy.stats.mad_std: 1 / Phi^-1(3/4)
_TARGET_MATCH_ARCSEC = 2.0  # a catalog star this close to the target IS the target


def flag_names(flags: int) -> list[str]:
    """Names of the bits set in ``flags`` (e.g. ``['edge', 'cosmic']``)."""
    return [name for bit, name in FLAG_NAMES.items() if int(flags) & bit]


@dataclass(frozen=True)
class FrameSummary:
    """Frame-level results of :func:`measure_frame`.

    Attributes
    ----------
    fwhm_px : float
        FWHM used to scale every radius (px).
    aperture_px, aperture_fwhm : float
        Optimal aperture radius (px; FWHM units).
    growth_radius_px : float
        Radius the aperture correction refers to (px).
    apcorr_mag : float
        Aperture correction (mag, <= 0): added to a magnitude measured in the
        optimal aperture it gives the magnitude within ``growth_radius_px``.
    apcorr_err_mag : float
        Uncertainty of ``apcorr_mag`` (mag), common to every star of the frame
        (it cancels in differential photometry and in a per-frame zero point).
    apcorr_scatter_mag : float
        Star-to-star scatter of the correction beyond measurement noise and
        pixel phase (mag); already included in every star's ``flux_err_e``.
    pixel_phase_mag : float
        Scatter of the optimal-aperture flux with the star's sub-pixel
        position (mag), modelled for this FWHM and radius (see
        :func:`pixel_phase_scatter`); included in every star's ``flux_err_e``.
    n_growth_stars : int
        Stars that built the curve of growth.
    n_stars : int
        Rows measured (catalog stars on the frame plus the target).
    sky_e_per_px, sky_sigma_e : float
        Median local sky (e-/px) and its median per-pixel scatter (e-).
    centroid_dx_px, centroid_dy_px : float
        Median offset of the centroids from the WCS positions (px).
    n_cosmic_px : int
        Pixels flagged as cosmic-ray hits on the frame.
    growth_radii_fwhm, growth_curve : tuple of float
        The normalised curve of growth (fraction of the flux inside the
        growth radius) sampled at these radii (FWHM units).
    """

    fwhm_px: float
    aperture_px: float
    aperture_fwhm: float
    growth_radius_px: float
    apcorr_mag: float
    apcorr_err_mag: float
    apcorr_scatter_mag: float
    n_growth_stars: int
    n_stars: int
    sky_e_per_px: float
    sky_sigma_e: float
    centroid_dx_px: float
    centroid_dy_px: float
    n_cosmic_px: int
    growth_radii_fwhm: tuple[float, ...] = ()
    growth_curve: tuple[float, ...] = ()
    pixel_phase_mag: float = 0.0


def star_ids(stars: Table) -> np.ndarray:
    """Identifiers of catalog rows: the ``id`` column, else the row number."""
    if "id" in stars.colnames:
        return np.array([str(v) for v in stars["id"]], dtype=object)
    return np.array([str(k) for k in range(len(stars))], dtype=object)


def measure_frame(
    data_e: np.ndarray,
    *,
    wcs: WCS,
    stars: Table,
    target_radec: tuple[float, float] | None,
    fwhm_px: float,
    gain_e_per_adu: float,
    rdnoise_e: float,
    exptime_s: float,
    mask: np.ndarray | None = None,
    target_name: str = "target",
    dark_e_per_px: float = 0.0,
    cfg: PhotometryConfig | None = None,
) -> tuple[Table, FrameSummary]:
    """Measure every catalog star on a calibrated frame, and the target.

    Parameters
    ----------
    data_e : ndarray
        Calibrated frame in electrons (bias-subtracted, flat-fielded, x gain).
    wcs : astropy.wcs.WCS
        The frame's (fitted) WCS.
    stars : astropy.table.Table
        Catalog: ``ra``, ``dec`` (deg), optional ``id``; other columns ignored.
    target_radec : (float, float) or None
        Target RA, Dec (deg). A catalog star within 2 arcsec of it is taken
        to be the target and measured once, as ``target_name``.
    fwhm_px : float
        Seeing FWHM on this frame (px); every radius scales with it.
    gain_e_per_adu, rdnoise_e : float
        Camera gain (e-/ADU, for the digitisation noise) and read noise (e-).
    exptime_s : float
        Exposure time (s), for ``mag_inst``.
    mask : ndarray of bool, optional
        True where a pixel is saturated or bad; such pixels are never used and
        a star with one in its aperture is flagged ``SATURATED``.
    target_name : str
        ``star_id`` of the target row.
    dark_e_per_px : float
        Dark charge (e-/px) that was subtracted from the frame; it adds only
        noise. Leave 0 when no dark was subtracted (the sky then holds it).
    cfg : PhotometryConfig, optional
        Radii, thresholds; defaults if omitted.

    Returns
    -------
    table : astropy.table.Table
        One row per star (target first): ``star_id``, ``x_px``, ``y_px``
        (0-based pixel position), ``flux_e`` (aperture-corrected, e-),
        ``flux_err_e``, ``mag_inst`` (= -2.5 log10(flux_e / exptime_s)),
        ``mag_inst_err``, ``aperture_px``, ``aperture_fwhm``, ``apcorr_mag``,
        ``sky_e_per_px``, ``flags`` (bits of this module).
        ``mag_inst_err`` is each star's own random error; the frame-common
        aperture-correction error is ``FrameSummary.apcorr_err_mag``.
    summary : FrameSummary
        Optimal aperture, aperture correction, sky, centroid offset.
    """
    cfg = cfg or PhotometryConfig()
    data = np.asarray(data_e, dtype=float)
    # A float32 frame (what the pipeline passes) is converted into a new array that
    # this function may then clean in place instead of copying 70 MB twice more.
    owned = isinstance(data_e, np.ndarray) and not np.may_share_memory(data, data_e)
    ny, nx = data.shape
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    bad |= ~np.isfinite(data)
    fwhm = float(fwhm_px)
    if not (fwhm > 0):
        raise ValueError(f"fwhm_px must be positive, got {fwhm_px!r}")

    # --- which stars, and where the WCS puts them -------------------------
    ids = list(star_ids(stars))
    ra = np.asarray(stars["ra"], float) if len(stars) else np.zeros(0)
    dec = np.asarray(stars["dec"], float) if len(stars) else np.zeros(0)
    if target_radec is not None:
        t_ra, t_dec = float(target_radec[0]), float(target_radec[1])
        sep = _separation_arcsec(ra, dec, t_ra, t_dec)
        keep = sep > _TARGET_MATCH_ARCSEC
        ids = [target_name] + [i for i, k in zip(ids, keep, strict=True) if k]
        ra = np.concatenate([[t_ra], ra[keep]])
        dec = np.concatenate([[t_dec], dec[keep]])
    n_all = len(ids)
    if n_all:
        xp, yp = wcs.all_world2pix(ra, dec, 0)
    else:
        xp, yp = np.zeros(0), np.zeros(0)
    xp, yp = np.asarray(xp, float), np.asarray(yp, float)
    on = np.isfinite(xp) & np.isfinite(yp) & (xp >= 0) & (xp <= nx - 1) \
        & (yp >= 0) & (yp <= ny - 1)
    is_target = np.zeros(n_all, bool)
    if target_radec is not None:
        is_target[0] = True
    rows = np.flatnonzero(on)  # stars we measure
    ids_on = [ids[k] for k in rows]
    x0, y0 = xp[rows], yp[rows]
    n = len(rows)

    # --- cosmic rays: detect, replace, remember where ---------------------
    cr_mask, clean, _ratio = _cosmic_rays(data, bad, rdnoise_e, x0, y0, fwhm, cfg,
                                          inplace=owned, data32=data_e if owned and getattr(
                                              data_e, "dtype", None) == np.float32 else None)
    bad_cr = bad | cr_mask

    # --- first pass: centroids and a rough flux at r = 1 FWHM -------------
    r_in, r_out = cfg.annulus_inner_fwhm * fwhm, cfg.annulus_outer_fwhm * fwhm
    sky0 = np.empty(n)
    sig0 = np.empty(n)
    nsky0 = np.empty(n, int)
    for k in range(n):
        sky0[k], sig0[k], nsky0[k] = _local_sky(clean, bad_cr, x0[k], y0[k], r_in, r_out,
                                                 x0, y0, k, fwhm, cfg.sky_clip_sigma)
    f0, a0 = _aperture_sums(clean, bad, x0, y0, [fwhm])
    flux0 = f0[:, 0] - sky0 * a0[:, 0]
    snr0 = flux0 / np.sqrt(np.maximum(flux0, 0) + a0[:, 0] * np.maximum(sig0, 1e-9) ** 2)
    snr0 = np.where(np.isfinite(snr0), snr0, 0.0)
    xc = np.full(n, np.nan)
    yc = np.full(n, np.nan)
    for k in range(n):
        if snr0[k] >= cfg.centroid_min_snr:
            xc[k], yc[k] = _windowed_centroid(clean, bad, x0[k], y0[k], fwhm, sky0[k])
    good_c = np.isfinite(xc) & (snr0 >= 2 * cfg.centroid_min_snr)
    dx = float(np.median(xc[good_c] - x0[good_c])) if good_c.sum() >= 3 else 0.0
    dy = float(np.median(yc[good_c] - y0[good_c])) if good_c.sum() >= 3 else 0.0
    x = x0 + dx
    y = y0 + dy
    flags = np.zeros(n, np.int64)
    max_shift = cfg.centroid_max_shift_fwhm * fwhm
    for k in range(n):
        if snr0[k] < cfg.centroid_min_snr:
            continue  # forced photometry: the shifted WCS position beats a noisy centroid
        if np.isfinite(xc[k]) and math.hypot(xc[k] - x[k], yc[k] - y[k]) <= max_shift:
            x[k], y[k] = xc[k], yc[k]
        else:
            flags[k] |= NO_CENTROID

    # --- cosmic rays on bright cores: the PSF is point-symmetric -----------
    # On a bright star's core the spike test above needs a hit to outshine the
    # star's own profile; a pixel standing far above its mirror image through
    # the star's centre is a hit however bright the star.
    # Stars whose centroid failed are not mirrored about a trustworthy centre,
    # and below 3 px FWHM bilinear interpolation of the core is too coarse.
    bright = np.flatnonzero((snr0 >= _MIRROR_MIN_SNR) & ~(flags & NO_CENTROID).astype(bool))
    if len(bright) and fwhm >= _MIRROR_MIN_FWHM_PX:
        mr, mc = _mirror_hits(clean, bad_cr, x, y, bright, cfg.aperture_max_fwhm * fwhm + 1.0,
                              sky0, rdnoise_e**2, cfg.cosmic_sigma, fwhm,
                              cfg.cosmic_mirror_tolerance)
        if len(mr):
            cr_mask[mr, mc] = True
            bad_cr[mr, mc] = True

    # --- local sky at the final positions ---------------------------------
    # A star that moved by a few hundredths of the annulus width keeps its
    # first-pass sky (the annulus is 2 FWHM wide): half the sky work on a frame
    # whose WCS is good. The mirror test's new hits lie inside apertures.
    sky, sky_sig, n_sky = sky0.copy(), sig0.copy(), nsky0.copy()
    moved = np.hypot(x - x0, y - y0) > _SKY_REUSE_FWHM * fwhm
    for k in np.flatnonzero(moved):
        sky[k], sky_sig[k], n_sky[k] = _local_sky(clean, bad_cr, x[k], y[k], r_in, r_out,
                                                  x, y, k, fwhm, cfg.sky_clip_sigma)
    nominal_sky_px = math.pi * (r_out**2 - r_in**2)
    flags[n_sky < max(20, 0.3 * nominal_sky_px)] |= BAD_SKY
    # Per-pixel noise: the CCD equation (sky + dark + read + digitisation) or
    # the annulus scatter when larger (faint stars, flat-field structure).
    ccd_var = np.maximum(sky, 0) + dark_e_per_px + rdnoise_e**2 + gain_e_per_adu**2 / 12.0
    pix_var = np.maximum(ccd_var, np.nan_to_num(sky_sig, nan=0.0) ** 2)
    sky_mean_var = pix_var / np.maximum(n_sky, 1) + cfg.sky_err_floor_e_per_px**2

    # --- curve of growth from bright isolated stars ------------------------
    step = 0.05
    radii_fwhm = np.round(np.arange(cfg.aperture_min_fwhm, cfg.aperture_max_fwhm + 1e-9, step), 4)
    r_big = cfg.growth_radius_fwhm * fwhm
    radii = np.concatenate([radii_fwhm * fwhm, [r_big]])
    flux_est = np.maximum(flux0, 0) / 0.6  # rough total flux, only to rank neighbours
    contam_big = _contamination(x, y, flux_est, r_big, fwhm)
    # Growth stars keep their whole annulus on the frame.
    edge_big = (x - r_out < 0) | (x + r_out > nx - 1) | (y - r_out < 0) | (y + r_out > ny - 1)
    bad_big = _any_in_circle(bad_cr, x, y, r_big)
    cand = (snr0 >= cfg.growth_min_snr) & ~edge_big & ~bad_big \
        & (contam_big < cfg.neighbour_max_contamination) & (flags == 0) & (n_sky >= 20)
    cand_idx = np.flatnonzero(cand)
    if len(cand_idx) < 3:  # a sparse or poor frame: accept fainter stars
        cand = (snr0 >= 30) & ~edge_big & ~bad_big & (contam_big < 0.05) & (flags == 0)
        cand_idx = np.flatnonzero(cand)
    cand_idx = cand_idx[np.argsort(-snr0[cand_idx])][: cfg.growth_max_stars]
    curve, r_opt, apcorr, apcorr_err, apcorr_scatter, phase = _growth(
        clean, bad, x[cand_idx], y[cand_idx], sky[cand_idx], pix_var[cand_idx],
        sky_mean_var[cand_idx], radii, radii_fwhm, fwhm, float(np.median(n_sky) if n else 1.0))

    # --- final photometry at the optimal aperture --------------------------
    # Near a star's core the neighbours' median underestimates a hit pixel;
    # its mirror image through the star's centre does not (a PSF is symmetric).
    # ``clean`` is this function's own array (see _cosmic_rays) and equals ``data``
    # wherever the repair reads, so it is repaired in place.
    clean = _mirror_repair(clean, clean, cr_mask, bad, x, y, r_opt + 1.0, inplace=True)
    sums, areas = _aperture_sums(clean, bad, x, y, [r_opt])
    flux_ap = sums[:, 0] - sky * areas[:, 0]
    var = np.maximum(flux_ap, 0) + areas[:, 0] * pix_var + areas[:, 0] ** 2 * sky_mean_var
    frac = 10 ** (0.4 * apcorr)  # fraction of the growth-radius flux inside r_opt
    flux = flux_ap / frac
    # Star-to-star terms a star's own counts do not show: the aperture
    # correction's scatter (PSF changes over the field) and the pixel phase.
    flux_err = np.sqrt(var / frac**2 + (flux / _MAG) ** 2 * (apcorr_scatter**2 + phase**2))
    contam = _contamination(x, y, flux_est, r_opt, fwhm)
    flags[contam > cfg.neighbour_max_contamination] |= NEIGHBOUR
    flags[(x - r_opt < -0.5) | (x + r_opt > nx - 0.5) | (y - r_opt < -0.5)
          | (y + r_opt > ny - 0.5)] |= EDGE
    # A pixel touched by the aperture counts: half a pixel beyond the radius.
    flags[_any_in_circle(bad, x, y, r_opt + 0.5)] |= SATURATED
    flags[_any_in_circle(cr_mask, x, y, r_opt + 0.5)] |= COSMIC
    flags[~(flux > 0)] |= NONPOSITIVE
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, -2.5 * np.log10(flux / exptime_s), np.nan)
        mag_err = np.where(flux > 0, _MAG * flux_err / flux, np.nan)

    # --- the table: the target first, off-frame target as a flagged NaN row
    out_ids: list[str] = []
    cols: dict[str, list] = {c: [] for c in COLUMNS if c != "star_id"}
    if target_radec is not None and not on[0]:
        out_ids.append(target_name)
        for c in cols:
            cols[c].append(np.nan)
        cols["flags"][-1] = OFF_FRAME
        cols["aperture_px"][-1] = r_opt
        cols["aperture_fwhm"][-1] = r_opt / fwhm
        cols["apcorr_mag"][-1] = apcorr
    for k in range(n):
        out_ids.append(ids_on[k])
        cols["x_px"].append(x[k])
        cols["y_px"].append(y[k])
        cols["flux_e"].append(flux[k])
        cols["flux_err_e"].append(flux_err[k])
        cols["mag_inst"].append(mag[k])
        cols["mag_inst_err"].append(mag_err[k])
        cols["aperture_px"].append(r_opt)
        cols["aperture_fwhm"].append(r_opt / fwhm)
        cols["apcorr_mag"].append(apcorr)
        cols["sky_e_per_px"].append(sky[k])
        cols["flags"].append(int(flags[k]))
    table = Table()
    table["star_id"] = np.array(out_ids, dtype=str) if out_ids else np.zeros(0, dtype="U1")
    for c, vals in cols.items():
        table[c] = np.array(vals, dtype=np.int64 if c == "flags" else float)
    for c, unit in (("x_px", "pix"), ("y_px", "pix"), ("flux_e", "electron"),
                    ("flux_err_e", "electron"), ("mag_inst", "mag"), ("mag_inst_err", "mag"),
                    ("aperture_px", "pix"), ("apcorr_mag", "mag"),
                    ("sky_e_per_px", "electron / pix")):
        table[c].unit = unit
    summary = FrameSummary(
        fwhm_px=fwhm, aperture_px=r_opt, aperture_fwhm=r_opt / fwhm, growth_radius_px=r_big,
        apcorr_mag=apcorr, apcorr_err_mag=apcorr_err, apcorr_scatter_mag=apcorr_scatter,
        n_growth_stars=len(cand_idx), n_stars=len(table),
        sky_e_per_px=float(np.median(sky)) if n else float("nan"),
        sky_sigma_e=float(np.median(np.sqrt(pix_var))) if n else float("nan"),
        centroid_dx_px=dx, centroid_dy_px=dy, n_cosmic_px=int(cr_mask.sum()),
        growth_radii_fwhm=tuple(float(r) for r in radii_fwhm),
        growth_curve=tuple(float(g) for g in curve),
        pixel_phase_mag=phase,
    )
    return table, summary


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

def _separation_arcsec(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    r1, d1, r0, d0 = map(np.radians, (ra, dec, ra0, dec0))
    h = np.sin((d1 - d0) / 2) ** 2 + np.cos(d1) * np.cos(d0) * np.sin((r1 - r0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def _cosmic_rays(data: np.ndarray, bad: np.ndarray, rdnoise_e: float, x: np.ndarray,
                 y: np.ndarray, fwhm: float, cfg: PhotometryConfig, *,
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
    half = max(int(round(fwhm)), 2)
    ny, nx = data.shape
    peaks_r, peaks_c = [], []
    for xi, yi in zip(x, y, strict=True):
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


def _mirror_repair(clean: np.ndarray, data: np.ndarray, hits: np.ndarray, bad: np.ndarray,
                   x: np.ndarray, y: np.ndarray, radius: float, *,
                   inplace: bool = False) -> np.ndarray:
    """Replace hit pixels within ``radius`` of a star by the point-mirrored value.

    The value at (2x - px, 2y - py) is bilinearly interpolated from ``data``;
    when any of the four pixels used is itself hit or bad the neighbours'
    median (already in ``clean``) stays. With ``inplace`` ``clean`` itself is
    repaired (only hit pixels are written; only pixels that are not hit are read).
    """
    if not hits.any():
        return clean
    out = clean if inplace else clean.copy()
    for xs, ys in zip(x, y, strict=True):
        sy, sx = _box(hits.shape, xs, ys, radius)
        iy, ix = np.nonzero(hits[sy, sx])
        if not len(iy):
            continue
        py, px = iy + sy.start, ix + sx.start
        near = (px - xs) ** 2 + (py - ys) ** 2 <= radius**2
        py, px = py[near], px[near]
        values, usable = _mirrored(data, xs, ys, px, py, hits, bad)
        out[py[usable], px[usable]] = values[usable]
    return out


# A star whose final position is within this many FWHM of its first-pass one
# keeps its first-pass sky.
_SKY_REUSE_FWHM = 0.05
# Stars at least this bright (S/N in a 1-FWHM aperture) get the mirror test:
# fainter cores are low enough for the spike test to see any hit that matters.
_MIRROR_MIN_SNR = 50.0
# Below this FWHM (px) the interpolated mirror image of a clean core misses by
# more than the tolerance (about 2 false hits per bright star at 1.5-2 px).
_MIRROR_MIN_FWHM_PX = 3.0


def _mirror_hits(img: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                 which: np.ndarray, radius: float, sky: np.ndarray, rd2: float, sigma: float,
                 fwhm: float, tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of bright stars' cores standing far above their point-mirrored value.

    For star ``k`` in ``which``, every good pixel within ``radius`` of its
    centre is compared with the bilinear interpolation of ``img`` at the
    point reflected through the centre (:func:`_mirrored`). A hit when the
    excess exceeds ``sigma`` times the noise of the two plus ``tolerance``
    times the mirror's height above ``sky[k]``. Pixels near another star
    (within 2 FWHM of it) are not judged: a neighbour is not point-symmetric
    about us. Returns (rows, cols) of the hits.
    """
    rows_out, cols_out = [], []
    for k in which:
        xs, ys = float(x[k]), float(y[k])
        sy, sx = _box(img.shape, xs, ys, radius)
        py, px = np.mgrid[sy, sx]
        py, px = py.ravel(), px.ravel()
        ok = ((px - xs) ** 2 + (py - ys) ** 2 <= radius**2) & ~bad[py, px]
        near = np.flatnonzero((np.abs(x - xs) < radius + 2 * fwhm)
                              & (np.abs(y - ys) < radius + 2 * fwhm))
        for j in near:
            if j != k:
                for qx, qy in ((px, py), (2 * xs - px, 2 * ys - py)):
                    ok &= (qx - x[j]) ** 2 + (qy - y[j]) ** 2 > (2.0 * fwhm) ** 2
        py, px = py[ok], px[ok]
        mirror, usable = _mirrored(img, xs, ys, px, py, bad)
        v = img[py, px]
        noise = np.sqrt(np.maximum(v, 0.0) + np.maximum(mirror, 0.0) + 2 * rd2)
        hit = usable & (v - mirror > sigma * noise
                        + tolerance * np.maximum(mirror - sky[k], 0.0))
        rows_out.append(py[hit])
        cols_out.append(px[hit])
    if not rows_out:
        return np.zeros(0, int), np.zeros(0, int)
    return np.concatenate(rows_out), np.concatenate(cols_out)


def _box(shape: tuple[int, int], x: float, y: float, half: float) -> tuple[slice, slice]:
    ny, nx = shape
    x0, x1 = max(int(math.floor(x - half)), 0), min(int(math.ceil(x + half)) + 1, nx)
    y0, y1 = max(int(math.floor(y - half)), 0), min(int(math.ceil(y + half)) + 1, ny)
    return slice(y0, max(y1, y0)), slice(x0, max(x1, x0))


def _local_sky(img: np.ndarray, bad: np.ndarray, x: float, y: float, r_in: float, r_out: float,
               xs: np.ndarray, ys: np.ndarray, self_k: int, fwhm: float,
               clip: float) -> tuple[float, float, int]:
    """Sigma-clipped mean and scatter of an annulus, neighbours' cores masked."""
    sy, sx = _box(img.shape, x, y, r_out)
    yy, xx = np.ogrid[sy, sx]  # broadcast: the same d2 as full index grids, less memory
    d2 = (xx - x) ** 2 + (yy - y) ** 2
    use = (d2 >= r_in**2) & (d2 <= r_out**2) & ~bad[sy, sx]
    # Mask other stars' cores: clipping alone leaves their wings, which bias the mean up.
    near = np.flatnonzero((np.abs(xs - x) < r_out + 2 * fwhm) & (np.abs(ys - y) < r_out + 2 * fwhm))
    for j in near:
        if j != self_k:
            use &= (xx - xs[j]) ** 2 + (yy - ys[j]) ** 2 > (2.0 * fwhm) ** 2
    vals = img[sy, sx][use]
    if vals.size < 5:
        return float(np.median(img[sy, sx])), float("nan"), int(vals.size)
    kept = _sigma_clipped(vals, clip)
    # The mean, not the median, of the clipped pixels: it has the smaller error,
    # and the error of the mean is what the CCD equation's sky term assumes.
    return float(kept.mean()), float(kept.std(ddof=1)), int(kept.size)


def _sigma_clipped(vals: np.ndarray, clip: float, maxiters: int = 10) -> np.ndarray:
    """The values astropy's ``sigma_clip(vals, sigma=clip, maxiters=maxiters,
    cenfunc="median", stdfunc="mad_std")`` keeps, in their order (same values).

    Clipping by value keeps a contiguous run of the sorted values, so one sort
    replaces the medians and copies of every iteration: the median is read off
    the run and the median absolute deviation found by bisection over its two
    halves. As in astropy, the values kept at the end are all those within the
    last bounds computed. Sorting is done in float32 when that is exact (frames
    converted from float32), which halves its cost.
    """
    if not np.isfinite(vals).all():
        return sigma_clip(vals, sigma=clip, maxiters=maxiters, cenfunc="median",
                          stdfunc="mad_std").compressed()
    v32 = vals.astype(np.float32)
    s = np.sort(v32) if np.array_equal(v32, vals) else np.sort(vals)
    lo, hi = 0, s.size
    low = high = None
    for _ in range(maxiters):
        n = hi - lo
        if n == 0:
            return vals[:0]
        k = lo + n // 2
        cen = float(s[k]) if n % 2 else (float(s[k - 1]) + float(s[k])) / 2
        mid = _bisect(s, cen, lo, hi, left=True)  # s[lo:mid] < cen <= s[mid:hi]
        if n % 2:
            mad = _kth_deviation(s, lo, mid, hi, cen, n // 2)
        else:
            mad = (_kth_deviation(s, lo, mid, hi, cen, n // 2 - 1)
                   + _kth_deviation(s, lo, mid, hi, cen, n // 2)) / 2
        std = mad * _MAD_TO_STD
        low, high = cen - (std * clip), cen + (std * clip)
        new_lo = _bisect(s, low, lo, hi, left=True)
        new_hi = _bisect(s, high, lo, hi, left=False)
        if new_lo == lo and new_hi == hi:
            break
        lo, hi = new_lo, new_hi
    if low is None:
        return vals
    return vals[(vals >= low) & (vals <= high)]


def _bisect(s: np.ndarray, value: float, lo: int, hi: int, *, left: bool) -> int:
    """First index in sorted ``s[lo:hi]`` whose value is >= (``left``) or > ``value``.

    Compares in float64 (``np.searchsorted`` would round ``value`` to a float32 ``s``).
    """
    while lo < hi:
        m = (lo + hi) // 2
        v = float(s[m])
        if v < value or (not left and v == value):
            lo = m + 1
        else:
            hi = m
    return lo


def _kth_deviation(s: np.ndarray, lo: int, mid: int, hi: int, cen: float, k: int) -> float:
    """k-th smallest (0-based) of ``|s[lo:hi] - cen|`` for sorted ``s``, ``s[mid-1] < cen <=
    s[mid]``: the deviations below ``cen`` and above it are two sorted runs."""
    na, nb = mid - lo, hi - mid

    def dev_a(i: int) -> float:  # i-th smallest deviation below the centre
        return cen - float(s[mid - 1 - i])

    def dev_b(j: int) -> float:  # j-th smallest deviation above it
        return float(s[mid + j]) - cen

    i_lo, i_hi = max(0, k + 1 - nb), min(k + 1, na)
    while i_lo < i_hi:  # how many of the k + 1 smallest come from below the centre
        i = (i_lo + i_hi) // 2
        if dev_a(i) < dev_b(k - i):
            i_lo = i + 1
        else:
            i_hi = i
    i, j = i_lo, k + 1 - i_lo
    return max(dev_a(i - 1) if i > 0 else -math.inf, dev_b(j - 1) if j > 0 else -math.inf)


def _windowed_centroid(img: np.ndarray, bad: np.ndarray, x: float, y: float,
                       fwhm: float, sky: float = 0.0) -> tuple[float, float]:
    """Gaussian-windowed centroid (SExtractor XWIN) of ``img - sky``; NaN when it does
    not converge."""
    sig = fwhm / 2.3548
    xi, yi = x, y
    for _ in range(20):
        sy, sx = _box(img.shape, xi, yi, 2.0 * fwhm)
        yy, xx = np.mgrid[sy, sx]
        w = np.exp(-((xx - xi) ** 2 + (yy - yi) ** 2) / (2 * sig**2)) * ~bad[sy, sx]
        wf = w * (img[sy, sx] - sky)
        tot = wf.sum()
        if not tot > 0:
            return float("nan"), float("nan")
        # The factor 2 makes the iteration converge to the true centre for a
        # Gaussian profile (Gaussian window times Gaussian star).
        ddx = 2.0 * float((wf * (xx - xi)).sum() / tot)
        ddy = 2.0 * float((wf * (yy - yi)).sum() / tot)
        ddx, ddy = np.clip(ddx, -fwhm, fwhm), np.clip(ddy, -fwhm, fwhm)
        xi, yi = xi + ddx, yi + ddy
        if math.hypot(xi - x, yi - y) > 3 * fwhm:
            return float("nan"), float("nan")
        if abs(ddx) < 1e-3 and abs(ddy) < 1e-3:
            return float(xi), float(yi)
    return float(xi), float(yi)


def _aperture_sums(img: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray,
                   radii: list[float] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sums (e-) and unmasked areas (px) of circular apertures: arrays (star, radius)."""
    n = len(x)
    sums = np.zeros((n, len(radii)))
    areas = np.zeros((n, len(radii)))
    if n == 0:
        return sums, areas
    pos = np.column_stack([x, y])
    # photutils leaves masked pixels out of the sums itself: no zeroed copy needed.
    for j, r in enumerate(radii):
        ap = CircularAperture(pos, r=float(r))
        # do_photometry, not aperture_photometry: the latter builds table
        # metadata (importing matplotlib) on every call, 10x the cost here.
        s_j, _ = ap.do_photometry(img, mask=bad, method="exact")
        sums[:, j] = np.asarray(s_j, float)
        areas[:, j] = np.asarray(ap.area_overlap(img, mask=bad), float)
    return sums, areas


def _any_in_circle(flagged: np.ndarray, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Whether any flagged pixel centre lies within ``r`` of each position."""
    out = np.zeros(len(x), bool)
    if not flagged.any():
        return out
    for k in range(len(x)):
        sy, sx = _box(flagged.shape, x[k], y[k], r)
        sub = flagged[sy, sx]
        if sub.any():
            yy, xx = np.mgrid[sy, sx]
            out[k] = bool((sub & ((xx - x[k]) ** 2 + (yy - y[k]) ** 2 <= r**2)).any())
    return out


def _contamination(x: np.ndarray, y: np.ndarray, flux: np.ndarray, r_ap: float,
                   fwhm: float) -> np.ndarray:
    """Fraction of each star's flux that neighbours add inside its aperture.

    A Moffat profile (beta 2.5, a typical seeing wing) is integrated over the
    aperture on a polar grid; this is a flagging estimate, not a correction.
    """
    n = len(x)
    out = np.zeros(n)
    if n < 2:
        return out
    beta = 2.5
    alpha = _moffat_alpha(fwhm, beta)
    rr = (np.arange(8) + 0.5) / 8 * r_ap
    th = np.arange(16) / 16 * 2 * np.pi
    px = (rr[:, None] * np.cos(th)[None, :]).ravel()
    py = (rr[:, None] * np.sin(th)[None, :]).ravel()
    dA = np.repeat(rr * (r_ap / 8) * (2 * np.pi / 16), 16)
    reach = r_ap + 8 * fwhm
    for i in range(n):
        if not flux[i] > 0:
            continue
        near = np.flatnonzero((np.abs(x - x[i]) < reach) & (np.abs(y - y[i]) < reach))
        tot = 0.0
        for j in near:
            if j == i or not flux[j] > 0:
                continue
            d2 = (x[i] + px - x[j]) ** 2 + (y[i] + py - y[j]) ** 2
            prof = (beta - 1) / (math.pi * alpha**2) * (1 + d2 / alpha**2) ** (-beta)
            tot += flux[j] * float((prof * dA).sum())
        out[i] = tot / flux[i]
    return out


def _growth(img: np.ndarray, bad: np.ndarray, x: np.ndarray, y: np.ndarray, sky: np.ndarray,
            pix_var: np.ndarray, sky_mean_var: np.ndarray, radii: np.ndarray,
            radii_fwhm: np.ndarray, fwhm: float,
            n_sky: float) -> tuple[np.ndarray, float, float, float, float, float]:
    """Curve of growth, optimal radius and aperture correction.

    Returns (normalised curve at ``radii_fwhm``, optimal radius px,
    correction mag, its error mag, star-to-star scatter mag, pixel-phase
    scatter mag).
    """
    n = len(x)
    if n == 0:
        # Nothing to learn from: the textbook optimum and no correction (flagged
        # by n_growth_stars = 0 in the summary; the zero point absorbs it).
        r_opt = 0.7 * fwhm
        phase = pixel_phase_scatter(fwhm, r_opt, _GAUSSIAN_BETA)
        return np.full(len(radii_fwhm), np.nan), r_opt, 0.0, 0.1, 0.0, phase
    sums, areas = _aperture_sums(img, bad, x, y, radii)
    net = sums - sky[:, None] * areas
    var = np.maximum(net, 0) + areas * pix_var[:, None] + areas**2 * sky_mean_var[:, None]
    total = net[:, -1]
    ok = total > 0
    g = net[ok, :-1] / total[ok, None]
    curve = np.median(g, axis=0) if ok.any() else np.full(len(radii_fwhm), np.nan)
    area = np.pi * (radii_fwhm * fwhm) ** 2
    # S/N of a sky-limited star (the ones whose errors matter) at each radius:
    # signal ~ G(r), noise ~ sqrt(area (1 + area / n_sky)) (pixel + sky-estimate noise).
    snr = curve / np.sqrt(area * (1 + area / max(n_sky, 1.0)))
    if not np.isfinite(snr).any():
        return (curve, 0.7 * fwhm, 0.0, 0.1, 0.0,
                pixel_phase_scatter(fwhm, 0.7 * fwhm, _GAUSSIAN_BETA))
    j = int(np.nanargmax(snr))
    r_opt = float(radii_fwhm[j] * fwhm)
    # Each growth star's correction also carries its own pixel phase at r_opt
    # (negligible at the growth radius): known, so not taken for PSF scatter.
    phase = pixel_phase_scatter(fwhm, r_opt, _moffat_beta(curve, radii_fwhm, radii[-1] / fwhm))
    # Per-star correction at r_opt and its noise (the two sums share the inner pixels).
    net_r, net_R = net[ok, j], total[ok]
    var_r, var_R = var[ok, j], var[ok, -1]
    gi = net_r / net_R
    rel_var = var_r / net_r**2 + var_R / net_R**2 - 2 * var_r / (net_r * net_R)
    noise = _MAG * np.sqrt(np.maximum(rel_var, 0))
    ci = -2.5 * np.log10(np.clip(gi, 1e-6, None))
    # Faint growth stars carry the sky noise of the big aperture: keep those
    # whose correction is known to 0.03 mag, and clip against the weighted
    # median with a 0.01 mag allowance (a star with an unseen neighbour).
    use = np.isfinite(ci) & (noise < 0.03)
    if not use.any():
        use = np.isfinite(ci) & (noise <= np.sort(noise)[min(2, len(noise) - 1)])
    ci, noise = ci[use], np.hypot(noise[use], phase)
    for _ in range(5):
        w = 1 / np.maximum(noise, 1e-4) ** 2
        centre = _weighted_median(ci, w)
        keep = np.abs(ci - centre) <= 3 * np.sqrt(noise**2 + 0.01**2)
        if keep.all() or keep.sum() < 2:
            break
        ci, noise = ci[keep], noise[keep]
    # The rest of the star-to-star part (PSF variation across the field) is
    # small: judge it only from stars measured to 5 mmag (beyond the phase
    # term), so that the unmodelled noise of fainter growth stars is not
    # mistaken for it.
    precise = noise < math.hypot(0.005, phase)
    scatter = _excess_scatter(ci[precise], noise[precise]) if precise.sum() >= 5 else 0.0
    w = 1 / (np.maximum(noise, 1e-4) ** 2 + scatter**2)
    # Convention: apcorr (mag, <= 0) is added to the aperture magnitude.
    apcorr = -float((w * ci).sum() / w.sum())
    err = math.sqrt(1 / w.sum())
    if len(ci) >= 3:
        chi2 = float((w * (ci + apcorr) ** 2).sum() / (len(ci) - 1))
        err *= math.sqrt(max(chi2, 1.0))
    return curve, r_opt, apcorr, err, scatter, phase


# --------------------------------------------------------------------------- pixel phase

_GAUSSIAN_BETA = math.inf  # a Moffat profile with beta -> infinity is a Gaussian
_BETAS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.5, 6.0, _GAUSSIAN_BETA)
_PHASE_GRID = 8  # sub-pixel positions per axis (64 stars)
_PHASE_SUBSAMPLE = 9  # pixel integration of the model PSF
_PHASE_MAX_FWHM_PX = 10.0  # beyond: < 0.2 mmag at 0.75 FWHM (Moffat beta 3), taken as 0
_phase_cache: dict[tuple[float, float, float], float] = {}


_FWHM_PER_SIGMA = 2.3548200450309493  # Gaussian: FWHM = 2 sqrt(2 ln 2) sigma


def _moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha (px) of a profile with this FWHM (px) and beta."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _profile(r2: np.ndarray, fwhm: float, beta: float) -> np.ndarray:
    """Moffat (Gaussian for infinite beta) surface brightness at squared radius ``r2``,
    1 at the centre."""
    if math.isinf(beta):
        return np.exp(-0.5 * r2 * (_FWHM_PER_SIGMA / fwhm) ** 2)
    return (1.0 + r2 / _moffat_alpha(fwhm, beta) ** 2) ** (-beta)


def _enclosed(r: np.ndarray, fwhm: float, beta: float) -> np.ndarray:
    """Fraction of a circular Moffat (or Gaussian) star's flux within radius ``r``."""
    r = np.asarray(r, float)
    if math.isinf(beta):
        return 1.0 - np.exp(-0.5 * (r * _FWHM_PER_SIGMA / fwhm) ** 2)
    return 1.0 - (1.0 + (r / _moffat_alpha(fwhm, beta)) ** 2) ** (1.0 - beta)


def _moffat_beta(curve: np.ndarray, radii_fwhm: np.ndarray, big_fwhm: float) -> float:
    """The Moffat beta (or Gaussian) whose curve of growth is nearest the measured one."""
    ok = np.isfinite(curve)
    if not ok.any():
        return _GAUSSIAN_BETA
    best, best_cost = _GAUSSIAN_BETA, math.inf
    for beta in _BETAS:
        model = _enclosed(radii_fwhm[ok], 1.0, beta) / _enclosed(np.array(big_fwhm), 1.0, beta)
        cost = float(np.sum((model - curve[ok]) ** 2))
        if cost < best_cost:
            best, best_cost = beta, cost
    return best


def pixel_phase_scatter(fwhm_px: float, radius_px: float, beta: float = 3.0) -> float:
    """Scatter of an aperture's flux with the star's position inside its pixel.

    An aperture sum weights each pixel by the area the circle covers, as if
    the pixel's light were spread evenly over it; with a PSF only a few pixels
    wide it is not, so the fraction of the flux a small aperture catches
    changes with where the star falls on the pixel grid (4-5 mmag at
    FWHM 3 px and 0.75 FWHM). The aperture correction takes out the mean;
    this is the scatter about it, which no photon count shows. Computed as
    the aperture-sum scatter of 64 pixel-integrated model stars on a regular
    grid of sub-pixel positions (cached per FWHM, radius and beta).

    Parameters
    ----------
    fwhm_px : float
        Seeing FWHM (px).
    radius_px : float
        Aperture radius (px).
    beta : float
        Moffat beta of the PSF model; ``math.inf`` for a Gaussian.

    Returns
    -------
    float
        Standard deviation of the aperture magnitude over sub-pixel positions
        (mag); 0 for FWHM above 10 px, where it is below 0.2 mmag.
    """
    fwhm, r = float(fwhm_px), float(radius_px)
    if not (fwhm > 0 and r > 0) or fwhm > _PHASE_MAX_FWHM_PX:
        return 0.0
    key = (round(fwhm, 3), round(r, 3), beta)
    if key in _phase_cache:
        return _phase_cache[key]
    g, sub = _PHASE_GRID, _PHASE_SUBSAMPLE
    cell = 2 * int(math.ceil(r)) + 6
    # star (i, j) sits at sub-pixel phase (phases[j], phases[i]) in the middle of its cell
    at = cell // 2 + (np.arange(g) + 0.5) / g
    offs = (np.arange(sub) + 0.5) / sub - 0.5
    local = (np.arange(cell)[:, None] + offs[None, :]).ravel()  # sub-sampled pixel centres
    img = np.zeros((g * cell, g * cell))
    for i in range(g):
        dy2 = (local - at[i]) ** 2
        for j in range(g):
            prof = _profile(dy2[:, None] + (local - at[j])[None, :] ** 2, fwhm, beta)
            img[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] = prof.reshape(
                cell, sub, cell, sub).mean(axis=(1, 3))
    corner = np.arange(g) * cell
    ys, xs = np.meshgrid(corner + at, corner + at, indexing="ij")
    sums = CircularAperture(np.column_stack([xs.ravel(), ys.ravel()]), r).do_photometry(img)[0]
    value = float(_MAG * np.std(sums) / np.mean(sums))
    if len(_phase_cache) > 4096:
        _phase_cache.clear()
    _phase_cache[key] = value
    return value


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, 0.5 * cw[-1])])


def _excess_scatter(values: np.ndarray, noise: np.ndarray) -> float:
    """Scatter beyond the measurement noise: s with sum r^2/(noise^2+s^2) = n-1."""
    n = len(values)
    if n < 3:
        return 0.0

    def reduced_chi2(s: float) -> float:
        w = 1 / (noise**2 + s**2)
        mean = (w * values).sum() / w.sum()
        return float((w * (values - mean) ** 2).sum() / (n - 1))

    if reduced_chi2(0.0) <= 1.0:
        return 0.0
    lo, hi = 0.0, float(np.ptp(values)) + 1e-6
    for _ in range(40):  # bisection: reduced chi^2 falls as s grows
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if reduced_chi2(mid) > 1.0 else (lo, mid)
    return 0.5 * (lo + hi)
