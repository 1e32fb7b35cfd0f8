"""Aperture photometry of one calibrated frame: every catalog star and the target.

Numeric only: arrays and tables in, a table and a summary out; no file,
database or clock. The steps, in order (see :func:`measure_frame`):

1. positions: catalog RA/Dec through the frame's WCS, then a windowed
   (Gaussian-weighted, SExtractor ``XWIN``-like) centroid for stars bright
   enough to centroid well; fainter stars are measured at the WCS position
   shifted by the frame's median centroid offset (forced photometry), because
   a noisy centroid biases a small aperture's flux low
   (:func:`_wcs_positions`, then :func:`_centroided_positions` with a
   first-pass sky and S/N from :func:`_annulus_skies` and :func:`_rough_flux`);
2. cosmic rays (:mod:`photd.cosmics`): a one-pass L.A.Cosmic-like test finds
   hits before any centroid, a point-mirror test those on bright cores after;
   a hit pixel is replaced by the median of its neighbours (near a core by its
   mirror image) and every star whose aperture holds one is flagged
   ``COSMIC`` (never silently biased);
3. local sky: sigma-clipped mean of an annulus (``annulus_*_fwhm``) with the
   cores of known neighbours masked, at the final positions
   (:func:`_final_sky`), and the noise of a pixel and of the sky estimate
   (:func:`_noise_variances`);
4. curve of growth of bright, isolated, unsaturated stars out to
   ``growth_radius_fwhm``: the normalised growth curve gives the optimal
   aperture (maximum S/N for a sky-limited star, about 0.7 FWHM) and the
   aperture correction from it to the large radius, with its uncertainty
   (:func:`_growth_stars`, :func:`_curve_of_growth`);
5. fluxes at the optimal aperture, aperture-corrected, with errors from the
   CCD equation (source, sky, read noise, dark, digitisation) plus the error
   of the sky estimate and the star-to-star scatter of the aperture
   correction (:func:`_aperture_fluxes`);
6. flags of each aperture (:func:`_aperture_flags`: neighbour, edge,
   saturated, cosmic, non-positive flux) and instrumental magnitudes.

Units: the frame is in electrons (bias-subtracted, flat-fielded, times the
gain); ``gain_e_per_adu`` only enters the digitisation-noise term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from astropy.stats import sigma_clip
from astropy.table import Table
from astropy.wcs import WCS
from photutils.aperture import CircularAperture

from photd import cosmics
from photd.config import PhotometryConfig
from photd.cosmics import pixel_box

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
# A star whose final position is within this many FWHM of its first-pass one
# keeps its first-pass sky.
_SKY_REUSE_FWHM = 0.05


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
    data, data32, owned, bad = _working_frame(data_e, mask)
    if not (float(fwhm_px) > 0):
        raise ValueError(f"fwhm_px must be positive, got {fwhm_px!r}")
    fwhm_px = float(fwhm_px)
    annulus_px = (cfg.annulus_inner_fwhm * fwhm_px, cfg.annulus_outer_fwhm * fwhm_px)
    growth_radius_px = cfg.growth_radius_fwhm * fwhm_px

    # 1. where the WCS puts the stars (the target first)
    ids, x_wcs_px, y_wcs_px, target_off_frame = _wcs_positions(
        stars, wcs, target_radec, target_name, data.shape)
    # 2. cosmic rays, the spike test: found and replaced in ``clean`` before any centroid
    cr_mask, clean, _ratio = cosmics.find_hits(data, bad, rdnoise_e, x_wcs_px, y_wcs_px, fwhm_px,
                                               cfg, inplace=owned, data32=data32)
    bad_cr = bad | cr_mask
    # 1. (continued) first-pass sky and S/N, centroids of the stars bright enough
    sky0 = _annulus_skies(clean, bad_cr, x_wcs_px, y_wcs_px, np.arange(len(ids)), annulus_px,
                          fwhm_px, cfg.sky_clip_sigma)
    flux0_e, snr0 = _rough_flux(clean, bad, x_wcs_px, y_wcs_px, sky0, fwhm_px)
    x_px, y_px, dx_px, dy_px, flags = _centroided_positions(clean, bad, x_wcs_px, y_wcs_px,
                                                            snr0, sky0.e_per_px, fwhm_px, cfg)
    # 2. (continued) the mirror test on bright cores, which needs their centroids
    hit_r, hit_c = cosmics.bright_core_hits(
        clean, bad_cr, x_px, y_px, snr0, (flags & NO_CENTROID) == 0,
        cfg.aperture_max_fwhm * fwhm_px + 1.0, sky0.e_per_px, rdnoise_e, fwhm_px, cfg)
    cr_mask[hit_r, hit_c] = True
    bad_cr[hit_r, hit_c] = True
    # 3. local sky at the final positions, and the noise of a pixel and of the sky
    sky = _final_sky(clean, bad_cr, x_px, y_px, x_wcs_px, y_wcs_px, sky0, annulus_px,
                     fwhm_px, cfg.sky_clip_sigma)
    flags[_too_few_sky_pixels(sky.n_px, annulus_px)] |= BAD_SKY
    pix_var, sky_mean_var = _noise_variances(sky, rdnoise_e, gain_e_per_adu, dark_e_per_px,
                                             cfg.sky_err_floor_e_per_px)
    # 4. curve of growth: optimal aperture and aperture correction
    flux_est_e = np.maximum(flux0_e, 0) / 0.6  # rough total flux, only to rank neighbours
    growth_idx = _growth_stars(x_px, y_px, snr0, flux_est_e, flags, sky.n_px, bad_cr,
                               growth_radius_px, annulus_px[1], data.shape, fwhm_px, cfg)
    growth = _curve_of_growth(clean, bad, x_px, y_px, growth_idx, sky, pix_var, sky_mean_var,
                              growth_radius_px, fwhm_px, cfg)
    aperture_radius_px = growth.aperture_radius_px
    # 5. fluxes at the optimal aperture, hits near a core repaired from their mirror
    # image first (``clean`` is this function's own array and equals ``data`` wherever
    # the repair reads, so it is repaired in place)
    clean = cosmics.mirror_repair(clean, clean, cr_mask, bad, x_px, y_px,
                                  aperture_radius_px + 1.0, inplace=True)
    flux_e, flux_err_e = _aperture_fluxes(clean, bad, x_px, y_px, sky, pix_var, sky_mean_var,
                                          growth)
    # 6. flags of the aperture, magnitudes
    flags |= _aperture_flags(x_px, y_px, flux_e, flux_est_e, aperture_radius_px, data.shape,
                             bad, cr_mask, fwhm_px, cfg)
    mag, mag_err = _magnitudes(flux_e, flux_err_e, exptime_s)

    table = _result_table(ids, x_px, y_px, flux_e, flux_err_e, mag, mag_err, sky.e_per_px,
                          flags, growth, fwhm_px,
                          off_frame_target=target_name if target_off_frame else None)
    summary = _frame_summary(growth, fwhm_px, len(growth_idx), len(table), sky.e_per_px,
                             pix_var, dx_px, dy_px, int(cr_mask.sum()))
    return table, summary


# ---------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------

class AnnulusSky(NamedTuple):
    """Local sky of each star (arrays over stars)."""

    e_per_px: np.ndarray  # sigma-clipped mean of the annulus (e-/px)
    sigma_e: np.ndarray  # per-pixel scatter of the kept pixels (e-); NaN: too few
    n_px: np.ndarray  # annulus pixels kept


class GrowthCurve(NamedTuple):
    """What the curve of growth of one frame gives (see :func:`_growth`)."""

    radii_fwhm: np.ndarray  # radii the curve is sampled at (FWHM units)
    curve: np.ndarray  # median fraction of the growth-radius flux inside each radius
    aperture_radius_px: float  # the optimal aperture
    growth_radius_px: float  # the radius the correction refers to
    apcorr_mag: float  # <= 0, added to an optimal-aperture magnitude
    apcorr_err_mag: float
    apcorr_scatter_mag: float
    pixel_phase_mag: float


def _working_frame(data_e: np.ndarray, mask: np.ndarray | None,
                   ) -> tuple[np.ndarray, np.ndarray | None, bool, np.ndarray]:
    """(frame as float64, the float32 frame it was converted from or None, whether
    the float64 frame is this call's own array, mask of unusable pixels)."""
    data = np.asarray(data_e, dtype=float)
    # A float32 frame (what the pipeline passes) is converted into a new array that
    # measure_frame may then clean in place instead of copying 70 MB twice more.
    owned = isinstance(data_e, np.ndarray) and not np.may_share_memory(data, data_e)
    data32 = data_e if owned and data_e.dtype == np.float32 else None
    bad = np.zeros(data.shape, bool) if mask is None else np.asarray(mask, bool).copy()
    bad |= ~np.isfinite(data)
    return data, data32, owned, bad


def _wcs_positions(stars: Table, wcs: WCS, target_radec: tuple[float, float] | None,
                   target_name: str,
                   shape: tuple[int, int]) -> tuple[list[str], np.ndarray, np.ndarray, bool]:
    """Which stars to measure, and where the WCS puts them.

    The target (when given) comes first; a catalog star within
    ``_TARGET_MATCH_ARCSEC`` of it is the target and is not measured twice.
    Returns (ids, x_px, y_px, target_off_frame) of the stars on the frame.
    """
    ny, nx = shape
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
    if ids:
        xp, yp = wcs.all_world2pix(ra, dec, 0)
    else:
        xp, yp = np.zeros(0), np.zeros(0)
    xp, yp = np.asarray(xp, float), np.asarray(yp, float)
    on = np.isfinite(xp) & np.isfinite(yp) & (xp >= 0) & (xp <= nx - 1) \
        & (yp >= 0) & (yp <= ny - 1)
    rows = np.flatnonzero(on)
    target_off_frame = target_radec is not None and not on[0]
    return [ids[k] for k in rows], xp[rows], yp[rows], bool(target_off_frame)


def _annulus_skies(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                   which: np.ndarray, annulus_px: tuple[float, float], fwhm_px: float,
                   clip_sigma: float, start: AnnulusSky | None = None) -> AnnulusSky:
    """Local sky (:func:`_local_sky`) of the stars ``which``, the other stars' cores
    masked; the rest keep their values in ``start`` (or are left unset)."""
    n = len(x_px)
    if start is None:
        sky, sig, n_sky = np.empty(n), np.empty(n), np.empty(n, int)
    else:
        sky, sig, n_sky = start.e_per_px.copy(), start.sigma_e.copy(), start.n_px.copy()
    r_in, r_out = annulus_px
    for k in which:
        sky[k], sig[k], n_sky[k] = _local_sky(img, bad, x_px[k], y_px[k], r_in, r_out,
                                              x_px, y_px, k, fwhm_px, clip_sigma)
    return AnnulusSky(sky, sig, n_sky)


def _rough_flux(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                sky: AnnulusSky, fwhm_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Sky-subtracted flux (e-) in a 1-FWHM aperture and its S/N (0 where undefined):
    which stars to centroid, which build the curve of growth."""
    f0, a0 = _aperture_sums(img, bad, x_px, y_px, [fwhm_px])
    flux0 = f0[:, 0] - sky.e_per_px * a0[:, 0]
    snr0 = flux0 / np.sqrt(np.maximum(flux0, 0) + a0[:, 0] * np.maximum(sky.sigma_e, 1e-9) ** 2)
    return flux0, np.where(np.isfinite(snr0), snr0, 0.0)


def _centroided_positions(
    img: np.ndarray, bad: np.ndarray, x_wcs_px: np.ndarray, y_wcs_px: np.ndarray,
    snr: np.ndarray, sky_e_per_px: np.ndarray, fwhm_px: float, cfg: PhotometryConfig,
) -> tuple[np.ndarray, np.ndarray, float, float, np.ndarray]:
    """Final positions: windowed centroids of the stars bright enough to centroid,
    the WCS positions shifted by the median centroid offset for the others.

    Returns (x_px, y_px, dx_px, dy_px, flags): ``flags`` holds ``NO_CENTROID``
    for a bright star whose centroid failed or ran beyond
    ``centroid_max_shift_fwhm`` (it keeps the shifted WCS position).
    """
    n = len(x_wcs_px)
    xc = np.full(n, np.nan)
    yc = np.full(n, np.nan)
    for k in range(n):
        if snr[k] >= cfg.centroid_min_snr:
            xc[k], yc[k] = _windowed_centroid(img, bad, x_wcs_px[k], y_wcs_px[k], fwhm_px,
                                              sky_e_per_px[k])
    good_c = np.isfinite(xc) & (snr >= 2 * cfg.centroid_min_snr)
    dx = float(np.median(xc[good_c] - x_wcs_px[good_c])) if good_c.sum() >= 3 else 0.0
    dy = float(np.median(yc[good_c] - y_wcs_px[good_c])) if good_c.sum() >= 3 else 0.0
    x = x_wcs_px + dx
    y = y_wcs_px + dy
    flags = np.zeros(n, np.int64)
    max_shift_px = cfg.centroid_max_shift_fwhm * fwhm_px
    for k in range(n):
        if snr[k] < cfg.centroid_min_snr:
            continue  # forced photometry: the shifted WCS position beats a noisy centroid
        if np.isfinite(xc[k]) and math.hypot(xc[k] - x[k], yc[k] - y[k]) <= max_shift_px:
            x[k], y[k] = xc[k], yc[k]
        else:
            flags[k] |= NO_CENTROID
    return x, y, dx, dy, flags


def _final_sky(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
               x_first_px: np.ndarray, y_first_px: np.ndarray, first: AnnulusSky,
               annulus_px: tuple[float, float], fwhm_px: float,
               clip_sigma: float) -> AnnulusSky:
    """Local sky at the final positions.

    A star that moved by a few hundredths of the annulus width keeps its
    first-pass sky (the annulus is 2 FWHM wide): half the sky work on a frame
    whose WCS is good. The mirror test's new hits lie inside apertures.
    """
    moved = np.hypot(x_px - x_first_px, y_px - y_first_px) > _SKY_REUSE_FWHM * fwhm_px
    return _annulus_skies(img, bad, x_px, y_px, np.flatnonzero(moved), annulus_px, fwhm_px,
                          clip_sigma, start=first)


def _too_few_sky_pixels(n_sky_px: np.ndarray, annulus_px: tuple[float, float]) -> np.ndarray:
    """Stars whose annulus kept too few clean pixels for a trustworthy sky (``BAD_SKY``)."""
    r_in, r_out = annulus_px
    nominal_sky_px = math.pi * (r_out**2 - r_in**2)
    return n_sky_px < max(20, 0.3 * nominal_sky_px)


def _noise_variances(sky: AnnulusSky, rdnoise_e: float, gain_e_per_adu: float,
                     dark_e_per_px: float,
                     sky_err_floor_e_per_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(variance of one pixel, variance of the sky estimate), e-^2, per star.

    Per-pixel noise: the CCD equation (sky + dark + read + digitisation) or
    the annulus scatter when larger (faint stars, flat-field structure).
    """
    ccd_var = np.maximum(sky.e_per_px, 0) + dark_e_per_px + rdnoise_e**2 \
        + gain_e_per_adu**2 / 12.0
    pix_var = np.maximum(ccd_var, np.nan_to_num(sky.sigma_e, nan=0.0) ** 2)
    sky_mean_var = pix_var / np.maximum(sky.n_px, 1) + sky_err_floor_e_per_px**2
    return pix_var, sky_mean_var


def _growth_stars(x_px: np.ndarray, y_px: np.ndarray, snr: np.ndarray, flux_est_e: np.ndarray,
                  flags: np.ndarray, n_sky_px: np.ndarray, bad: np.ndarray,
                  growth_radius_px: float, annulus_outer_px: float, shape: tuple[int, int],
                  fwhm_px: float, cfg: PhotometryConfig) -> np.ndarray:
    """Indices of the bright, isolated, clean stars that build the curve of growth,
    brightest first (at most ``growth_max_stars``)."""
    ny, nx = shape
    x, y, r_big, r_out = x_px, y_px, growth_radius_px, annulus_outer_px
    contam_big = _contamination(x, y, flux_est_e, r_big, fwhm_px)
    # Growth stars keep their whole annulus on the frame.
    edge_big = (x - r_out < 0) | (x + r_out > nx - 1) | (y - r_out < 0) | (y + r_out > ny - 1)
    bad_big = _any_in_circle(bad, x, y, r_big)
    cand = (snr >= cfg.growth_min_snr) & ~edge_big & ~bad_big \
        & (contam_big < cfg.neighbour_max_contamination) & (flags == 0) & (n_sky_px >= 20)
    cand_idx = np.flatnonzero(cand)
    if len(cand_idx) < 3:  # a sparse or poor frame: accept fainter stars
        cand = (snr >= 30) & ~edge_big & ~bad_big & (contam_big < 0.05) & (flags == 0)
        cand_idx = np.flatnonzero(cand)
    return cand_idx[np.argsort(-snr[cand_idx])][: cfg.growth_max_stars]


def _curve_of_growth(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                     which: np.ndarray, sky: AnnulusSky, pix_var: np.ndarray,
                     sky_mean_var: np.ndarray, growth_radius_px: float, fwhm_px: float,
                     cfg: PhotometryConfig) -> GrowthCurve:
    """The curve of growth of the stars ``which`` out to ``growth_radius_px``, sampled
    every 0.05 FWHM from ``aperture_min_fwhm`` to ``aperture_max_fwhm`` (:func:`_growth`)."""
    step = 0.05
    radii_fwhm = np.round(np.arange(cfg.aperture_min_fwhm, cfg.aperture_max_fwhm + 1e-9, step), 4)
    radii_px = np.concatenate([radii_fwhm * fwhm_px, [growth_radius_px]])
    n_sky_px = float(np.median(sky.n_px) if len(x_px) else 1.0)
    curve, r_opt, apcorr, apcorr_err, apcorr_scatter, phase = _growth(
        img, bad, x_px[which], y_px[which], sky.e_per_px[which], pix_var[which],
        sky_mean_var[which], radii_px, radii_fwhm, fwhm_px, n_sky_px)
    return GrowthCurve(radii_fwhm, curve, r_opt, growth_radius_px, apcorr, apcorr_err,
                       apcorr_scatter, phase)


def _aperture_fluxes(img: np.ndarray, bad: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                     sky: AnnulusSky, pix_var: np.ndarray, sky_mean_var: np.ndarray,
                     growth: GrowthCurve) -> tuple[np.ndarray, np.ndarray]:
    """Aperture-corrected fluxes (e-) at the optimal aperture and their errors (e-).

    The CCD equation (source, pixel noise, error of the sky estimate), then the
    star-to-star terms a star's own counts do not show: the aperture
    correction's scatter (PSF changes over the field) and the pixel phase.
    """
    sums, areas = _aperture_sums(img, bad, x_px, y_px, [growth.aperture_radius_px])
    flux_ap = sums[:, 0] - sky.e_per_px * areas[:, 0]
    var = np.maximum(flux_ap, 0) + areas[:, 0] * pix_var + areas[:, 0] ** 2 * sky_mean_var
    frac = 10 ** (0.4 * growth.apcorr_mag)  # fraction of the growth-radius flux inside r_opt
    flux = flux_ap / frac
    flux_err = np.sqrt(var / frac**2 + (flux / _MAG) ** 2
                       * (growth.apcorr_scatter_mag**2 + growth.pixel_phase_mag**2))
    return flux, flux_err


def _aperture_flags(x_px: np.ndarray, y_px: np.ndarray, flux_e: np.ndarray,
                    flux_est_e: np.ndarray, aperture_radius_px: float, shape: tuple[int, int],
                    bad: np.ndarray, cr_mask: np.ndarray, fwhm_px: float,
                    cfg: PhotometryConfig) -> np.ndarray:
    """``NEIGHBOUR``, ``EDGE``, ``SATURATED``, ``COSMIC`` and ``NONPOSITIVE`` bits."""
    ny, nx = shape
    x, y, r = x_px, y_px, aperture_radius_px
    flags = np.zeros(len(x), np.int64)
    contam = _contamination(x, y, flux_est_e, r, fwhm_px)
    flags[contam > cfg.neighbour_max_contamination] |= NEIGHBOUR
    flags[(x - r < -0.5) | (x + r > nx - 0.5) | (y - r < -0.5) | (y + r > ny - 0.5)] |= EDGE
    # A pixel touched by the aperture counts: half a pixel beyond the radius.
    flags[_any_in_circle(bad, x, y, r + 0.5)] |= SATURATED
    flags[_any_in_circle(cr_mask, x, y, r + 0.5)] |= COSMIC
    flags[~(flux_e > 0)] |= NONPOSITIVE
    return flags


def _magnitudes(flux_e: np.ndarray, flux_err_e: np.ndarray,
                exptime_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Instrumental magnitudes ``-2.5 log10(flux_e / exptime_s)`` and their errors (mag);
    NaN where the flux is not positive."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux_e > 0, -2.5 * np.log10(flux_e / exptime_s), np.nan)
        mag_err = np.where(flux_e > 0, _MAG * flux_err_e / flux_e, np.nan)
    return mag, mag_err


def _result_table(ids: list[str], x_px: np.ndarray, y_px: np.ndarray, flux_e: np.ndarray,
                  flux_err_e: np.ndarray, mag: np.ndarray, mag_err: np.ndarray,
                  sky_e_per_px: np.ndarray, flags: np.ndarray, growth: GrowthCurve,
                  fwhm_px: float, *, off_frame_target: str | None) -> Table:
    """The table of :func:`measure_frame`: the target first, an off-frame target
    (``off_frame_target``, its name) as a flagged NaN row."""
    r_opt = growth.aperture_radius_px
    out_ids: list[str] = []
    cols: dict[str, list] = {c: [] for c in COLUMNS if c != "star_id"}
    if off_frame_target is not None:
        out_ids.append(off_frame_target)
        for c in cols:
            cols[c].append(np.nan)
        cols["flags"][-1] = OFF_FRAME
        cols["aperture_px"][-1] = r_opt
        cols["aperture_fwhm"][-1] = r_opt / fwhm_px
        cols["apcorr_mag"][-1] = growth.apcorr_mag
    for k in range(len(ids)):
        out_ids.append(ids[k])
        cols["x_px"].append(x_px[k])
        cols["y_px"].append(y_px[k])
        cols["flux_e"].append(flux_e[k])
        cols["flux_err_e"].append(flux_err_e[k])
        cols["mag_inst"].append(mag[k])
        cols["mag_inst_err"].append(mag_err[k])
        cols["aperture_px"].append(r_opt)
        cols["aperture_fwhm"].append(r_opt / fwhm_px)
        cols["apcorr_mag"].append(growth.apcorr_mag)
        cols["sky_e_per_px"].append(sky_e_per_px[k])
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
    return table


def _frame_summary(growth: GrowthCurve, fwhm_px: float, n_growth_stars: int, n_rows: int,
                   sky_e_per_px: np.ndarray, pix_var: np.ndarray, dx_px: float, dy_px: float,
                   n_cosmic_px: int) -> FrameSummary:
    r_opt = growth.aperture_radius_px
    n = len(sky_e_per_px)
    return FrameSummary(
        fwhm_px=fwhm_px, aperture_px=r_opt, aperture_fwhm=r_opt / fwhm_px,
        growth_radius_px=growth.growth_radius_px, apcorr_mag=growth.apcorr_mag,
        apcorr_err_mag=growth.apcorr_err_mag, apcorr_scatter_mag=growth.apcorr_scatter_mag,
        n_growth_stars=n_growth_stars, n_stars=n_rows,
        sky_e_per_px=float(np.median(sky_e_per_px)) if n else float("nan"),
        sky_sigma_e=float(np.median(np.sqrt(pix_var))) if n else float("nan"),
        centroid_dx_px=dx_px, centroid_dy_px=dy_px, n_cosmic_px=n_cosmic_px,
        growth_radii_fwhm=tuple(float(r) for r in growth.radii_fwhm),
        growth_curve=tuple(float(g) for g in growth.curve),
        pixel_phase_mag=growth.pixel_phase_mag,
    )


def _separation_arcsec(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    r1, d1, r0, d0 = map(np.radians, (ra, dec, ra0, dec0))
    h = np.sin((d1 - d0) / 2) ** 2 + np.cos(d1) * np.cos(d0) * np.sin((r1 - r0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def _local_sky(img: np.ndarray, bad: np.ndarray, x: float, y: float, r_in: float, r_out: float,
               xs: np.ndarray, ys: np.ndarray, self_k: int, fwhm: float,
               clip: float) -> tuple[float, float, int]:
    """Sigma-clipped mean and scatter of an annulus, neighbours' cores masked."""
    sy, sx = pixel_box(img.shape, x, y, r_out)
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
        sy, sx = pixel_box(img.shape, xi, yi, 2.0 * fwhm)
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
        sy, sx = pixel_box(flagged.shape, x[k], y[k], r)
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
