"""Zero points, colour terms, the comparison ensemble and the light curve.

Numeric only: tables in, rows out; no file, database or clock.

Photometric model (per band, per frame ``f``)::

    mag_inst(star, f) = m_std(star) + c * colour(star) + Z(f)

where ``colour`` is g-r for the g and r cameras and r-i for i, ``c`` the
nightly colour term (:func:`fit_colour_term`) and ``Z(f)`` the frame's zero
point, holding extinction (k * airmass), transparency and the aperture
correction's frame-common error. :func:`zero_point` fits ``-Z(f)`` from the
catalog stars of one frame; :func:`derive_lightcurve` measures the target
against a comparison ensemble, re-deriving the whole curve from the stored
per-star measurements each time, so a revised ensemble revises every point.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import astropy.units as u
import numpy as np
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.table import Table
from astropy.time import Time
from astropy.utils import iers

from photd.config import PhotometryConfig, SiteConfig
from photd.photometry import EDGE, OFF_FRAME, flag_names, star_ids

# Offline: the IERS tables bundled with astropy are enough for BJD to < 1 ms.
iers.conf.auto_download = False

# Flags added by this module to a light-curve row (above the photometry bits).
FEW_COMPARISONS = 256  # fewer than comparison_min_stars comparisons on the frame

COLOUR_INDEX = {"g": ("g", "r"), "r": ("g", "r"), "i": ("r", "i")}
_CAL_FLOOR_MAG = 0.005  # catalog-to-instrument systematics (flat, colour) per star
_MAG = 2.5 / math.log(10.0)


@dataclass(frozen=True)
class ZeroPoint:
    """A frame's zero point: ``m_std = mag_inst + zp - colour_term * colour``.

    Attributes
    ----------
    zp, zp_err : float
        Zero point and its uncertainty (mag).
    n_stars : int
        Catalog stars kept after outlier rejection.
    scatter : float
        RMS of the kept stars' residuals (mag).
    colour_term : float
        Colour term used (mag per mag of colour).
    """

    zp: float
    zp_err: float
    n_stars: int
    scatter: float
    colour_term: float


@dataclass
class EnsembleInfo:
    """The comparison ensemble behind a light curve.

    Attributes
    ----------
    comparison_ids : list of str
        Comparisons used (sorted).
    ensemble_version : str
        Short hash of the sorted ids: a row with another version was derived
        against another ensemble.
    rejected : dict
        Star id -> reason it was dropped (e.g. ``"variable: chi2/dof 41.2"``).
    excluded : dict
        Star id -> reason it was never a candidate (e.g. ``"flagged neighbour on
        the first frame"``), for every star that failed a selection test.
    fixed : bool
        True when the list came from ``PhotometryConfig.comparison_stars``.
    colour_term : float
        Colour term applied (mag per mag).
    ensemble_mag : float
        Weighted catalog magnitude of the ensemble: ``mag = diff_mag + ensemble_mag``.
    chi2 : dict
        Star id -> reduced chi^2 of its curve against the other comparisons
        (NaN while fewer than 3 frames can judge it).
    curves : dict
        Star id -> list of (mjd, delta_mag, err): each comparison against the
        others, mean removed (for the plot).
    """

    comparison_ids: list[str] = field(default_factory=list)
    ensemble_version: str = ""
    rejected: dict[str, str] = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)
    fixed: bool = False
    colour_term: float = 0.0
    ensemble_mag: float = float("nan")
    chi2: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)


def ensemble_version(ids: list[str] | tuple[str, ...]) -> str:
    """A short stable hash of a set of comparison ids (order does not matter)."""
    return hashlib.sha1(",".join(sorted(ids)).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------
# Catalog helpers
# ---------------------------------------------------------------------------

def _catalog_lookup(catalog: Table, band: str) -> dict[str, tuple[float, float, float]]:
    """Star id -> (mag, mag_err, colour) in ``band`` (NaN where unknown)."""
    ids = star_ids(catalog)
    c1, c2 = COLOUR_INDEX[band]

    def col(name: str) -> np.ndarray:
        if name not in catalog.colnames:
            return np.full(len(catalog), np.nan)
        return np.asarray(np.ma.filled(np.ma.asarray(catalog[name], dtype=float), np.nan))

    mag, colour = col(band), col(c1) - col(c2)
    err = col(f"{band}_err")
    err = np.where(np.isfinite(err), err, 0.03)  # an unknown catalog error: a typical survey's
    return {str(i): (float(m), float(e), float(c))
            for i, m, e, c in zip(ids, mag, err, colour, strict=True)}


def _usable(meas: Table) -> np.ndarray:
    return (np.asarray(meas["flags"]) == 0) & np.isfinite(np.asarray(meas["mag_inst"], float)) \
        & np.isfinite(np.asarray(meas["mag_inst_err"], float))


# ---------------------------------------------------------------------------
# Zero point and colour term
# ---------------------------------------------------------------------------

def fit_colour_term(measurements: Table, catalog: Table, band: str, *,
                    clip_sigma: float = 3.0,
                    exclude: tuple[str, ...] | list[str] = ()) -> tuple[float, float, int]:
    """Nightly colour term of one band from every frame's catalog stars.

    Fits ``mag_inst - m_std = c * colour + Z(f)`` with one free ``Z`` per
    frame (the frame means are removed), iteratively clipping outliers.

    Parameters
    ----------
    measurements : astropy.table.Table
        :func:`photd.photometry.measure_frame` rows of many frames, with a
        ``frame`` column.
    catalog : astropy.table.Table
        Reference catalog (``id``, g, r, i, optional ``*_err``).
    band : str
        ``g``, ``r`` or ``i``.
    clip_sigma : float
        Outlier rejection threshold (robustly scaled).
    exclude : sequence of str
        Star ids never used (targets: they vary).

    Returns
    -------
    (c, c_err, n) : (float, float, int)
        Colour term (mag/mag), its error, stars x frames used. (0, inf, 0)
        when the colours do not constrain it.
    """
    look = _catalog_lookup(catalog, band)
    m = measurements[_usable(measurements)
                     & ~np.isin(np.asarray(measurements["star_id"]).astype(str), list(exclude))]
    frames = np.asarray(m["frame"])
    ids = [str(s) for s in m["star_id"]]
    std = np.array([look.get(i, (np.nan,) * 3)[0] for i in ids])
    cerr = np.array([look.get(i, (np.nan,) * 3)[1] for i in ids])
    col = np.array([look.get(i, (np.nan,) * 3)[2] for i in ids])
    y = np.asarray(m["mag_inst"], float) - std
    err = np.sqrt(np.asarray(m["mag_inst_err"], float) ** 2 + cerr**2 + _CAL_FLOOR_MAG**2)
    ok = np.isfinite(y) & np.isfinite(col) & (err < 0.05)
    c = 0.0
    for _ in range(10):
        w = np.where(ok, 1 / err**2, 0.0)
        # Remove each frame's weighted mean (the per-frame zero point).
        yd = np.zeros_like(y)
        xd = np.zeros_like(y)
        for f in np.unique(frames):
            s = frames == f
            ws = w[s].sum()
            if ws <= 0:
                continue
            yd[s] = y[s] - (w[s] * np.nan_to_num(y[s])).sum() / ws
            xd[s] = col[s] - (w[s] * np.nan_to_num(col[s])).sum() / ws
        # A star without a catalog colour has weight 0, but 0 * NaN is NaN.
        yd, xd = np.where(ok, yd, 0.0), np.where(ok, xd, 0.0)
        sxx = (w * xd**2).sum()
        if sxx <= 0 or ok.sum() < 5:
            return 0.0, float("inf"), 0
        c = float((w * xd * yd).sum() / sxx)
        res = yd - c * xd
        new_ok = ok & (np.abs(res) < clip_sigma * err * max(1.0, _robust_chi(res[ok] / err[ok])))
        if (new_ok == ok).all():
            break
        ok = np.isfinite(y) & np.isfinite(col) & (err < 0.05) & new_ok
    w = np.where(ok, 1 / err**2, 0.0)
    chi = max(1.0, _robust_chi(res[ok] / err[ok]))
    return c, float(chi / math.sqrt(sxx)), int(ok.sum())


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cw = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cw, 0.5 * cw[-1])])


def _robust_chi(z: np.ndarray) -> float:
    z = z[np.isfinite(z)]
    return float(1.4826 * np.median(np.abs(z - np.median(z)))) if len(z) else 1.0


def zero_point(meas: Table, catalog: Table, band: str, *, colour_term: float | None = None,
               clip_sigma: float = 3.0, exclude: tuple[str, ...] | list[str] = ()) -> ZeroPoint:
    """Zero point of one frame from its catalog stars, outliers rejected.

    ``m_std = mag_inst + zp - colour_term * colour``; stars are weighted by
    their measurement and catalog errors (plus a 5 mmag floor), and stars
    beyond ``clip_sigma`` (a variable, a blend) are rejected iteratively.

    Parameters
    ----------
    meas : astropy.table.Table
        One frame's :func:`photd.photometry.measure_frame` table.
    catalog : astropy.table.Table
        Reference catalog.
    band : str
        ``g``, ``r`` or ``i``.
    colour_term : float, optional
        From :func:`fit_colour_term`; 0 when omitted.
    clip_sigma : float
        Rejection threshold (in units of each star's error, scaled up by the
        robust scatter of the frame).
    exclude : sequence of str
        Star ids never used: the target (a catalog may list it, and it varies).
    """
    c = float(colour_term or 0.0)
    look = _catalog_lookup(catalog, band)
    m = meas[_usable(meas) & ~np.isin(np.asarray(meas["star_id"]).astype(str), list(exclude))]
    vals = [look.get(str(i), (np.nan,) * 3) for i in m["star_id"]]
    std = np.array([v[0] for v in vals])
    cerr = np.array([v[1] for v in vals])
    col = np.array([v[2] for v in vals])
    col = np.where(np.isfinite(col), col, np.nan if c else 0.0)
    y = std - np.asarray(m["mag_inst"], float) + c * col
    err = np.sqrt(np.asarray(m["mag_inst_err"], float) ** 2 + cerr**2 + _CAL_FLOOR_MAG**2)
    ok = np.isfinite(y) & (err < 0.1)
    if not ok.any():
        return ZeroPoint(float("nan"), float("nan"), 0, float("nan"), c)
    for _ in range(10):
        # Clip around the weighted median: one bright outlier (a variable the
        # catalog lists) would drag a weighted mean towards itself.
        centre = _weighted_median(y[ok], 1 / err[ok] ** 2)
        scale = max(1.0, _robust_chi((y[ok] - centre) / err[ok]))
        new_ok = ok & (np.abs(y - centre) < clip_sigma * scale * err)
        if new_ok.sum() < 2 or (new_ok == ok).all():
            break
        ok = new_ok
    w = 1 / err[ok] ** 2
    zp = float((w * y[ok]).sum() / w.sum())
    n = int(ok.sum())
    chi2 = float((w * (y[ok] - zp) ** 2).sum() / max(n - 1, 1))
    zp_err = math.sqrt(1 / w.sum()) * math.sqrt(max(chi2, 1.0))
    scatter = float(np.sqrt(np.mean((y[ok] - zp) ** 2)))
    return ZeroPoint(zp, zp_err, n, scatter, c)


def calibrate(meas: Table, zp: ZeroPoint, catalog: Table, band: str) -> Table:
    """Copy of ``meas`` with calibrated ``mag`` and ``mag_err`` columns.

    Stars without a catalog colour get no colour correction (their ``mag``
    then carries ``colour_term * colour`` of error).
    """
    look = _catalog_lookup(catalog, band)
    out = meas.copy()
    col = np.array([look.get(str(i), (np.nan,) * 3)[2] for i in meas["star_id"]])
    col = np.where(np.isfinite(col), col, 0.0)
    out["mag"] = np.asarray(meas["mag_inst"], float) + zp.zp - zp.colour_term * col
    out["mag_err"] = np.hypot(np.asarray(meas["mag_inst_err"], float), zp.zp_err)
    return out


# ---------------------------------------------------------------------------
# Time and airmass
# ---------------------------------------------------------------------------

def _location(site: SiteConfig) -> EarthLocation:
    return EarthLocation.from_geodetic(lon=site.longitude_deg * u.deg,
                                       lat=site.latitude_deg * u.deg,
                                       height=site.elevation_m * u.m)


def times(date_obs_start: str, exptime_s: float, ra_deg: float, dec_deg: float,
          site: SiteConfig) -> tuple[float, float]:
    """Mid-exposure MJD (UTC) and BJD_TDB of an exposure.

    Parameters
    ----------
    date_obs_start : str
        ISO UTC start of the exposure (``DATE-OBS``).
    exptime_s : float
        Exposure time (s).
    ra_deg, dec_deg : float
        Target ICRS position (deg), for the light travel time.
    site : SiteConfig
        Observatory (the topocentric part of the correction, up to 21 ms).

    Returns
    -------
    (mjd_mid, bjd_tdb) : (float, float)
        ``mjd_mid`` in days (UTC MJD); ``bjd_tdb`` a full Julian date (TDB).
    """
    loc = _location(site)
    t = Time(date_obs_start, format="isot", scale="utc", location=loc) \
        + 0.5 * float(exptime_s) * u.s
    ltt = t.light_travel_time(SkyCoord(ra_deg, dec_deg, unit="deg", frame="icrs"),
                              kind="barycentric")
    bjd = t.tdb + ltt
    return float(t.utc.mjd), float(bjd.jd1 + bjd.jd2)


def airmass(mjd_utc: float, ra_deg: float, dec_deg: float, site: SiteConfig) -> float:
    """sec(z) of a position at a time (no refraction; NaN below the horizon)."""
    t = Time(mjd_utc, format="mjd", scale="utc")
    aa = SkyCoord(ra_deg, dec_deg, unit="deg").transform_to(
        AltAz(obstime=t, location=_location(site)))
    alt = float(aa.alt.deg)
    return 1 / math.sin(math.radians(alt)) if alt > 0 else float("nan")


# ---------------------------------------------------------------------------
# The differential light curve
# ---------------------------------------------------------------------------

def derive_lightcurve(
    measurements: Table,
    catalog: Table,
    *,
    target: str,
    band: str,
    cfg: PhotometryConfig | None = None,
    colour_term: float | None = None,
    target_id: str | None = None,
    relative: bool = False,
) -> tuple[list[dict], EnsembleInfo]:
    """The target's differential light curve from every frame measured so far.

    Parameters
    ----------
    measurements : astropy.table.Table
        All stored per-star rows of one target and band: the
        :func:`photd.photometry.measure_frame` columns plus ``frame`` and,
        repeated on each row of a frame, ``mjd``, ``bjd_tdb``, ``airmass``,
        ``fwhm_arcsec`` (missing ones give NaN in the rows).
    catalog : astropy.table.Table
        Reference catalog (``id``, magnitudes, errors).
    target : str
        Target name (for the rows and ``comparison_stars`` lookup).
    band : str
        ``g``, ``r`` or ``i``.
    cfg : PhotometryConfig, optional
        Ensemble size and thresholds; ``comparison_stars[target]`` fixes the list.
    colour_term : float, optional
        Nightly colour term; fitted from ``measurements`` when omitted.
    target_id : str, optional
        ``star_id`` of the target rows (default: ``target``).
    relative : bool
        No catalog covers the field (every frame registered to a reference
        frame, stars ``R<band>-<n>`` without catalog magnitudes): comparisons
        are chosen without catalog magnitudes or colours, no colour term is
        applied, ``diff_mag`` is target - ensemble in instrumental magnitudes
        and ``mag``, ``mag_err`` are NaN. ``catalog`` may then be None.

    Returns
    -------
    rows : list of dict
        One per frame, in frame order: frame, target, band, mjd, bjd_tdb,
        mag, mag_err, diff_mag, diff_mag_err, airmass, fwhm_arcsec,
        aperture_px, flags, ensemble_version, comparison_ids, n_comparisons.
        ``diff_mag`` = target - ensemble (colour-corrected, standard system);
        ``mag`` = ``diff_mag`` + the ensemble's catalog magnitude.
    info : EnsembleInfo
        The ensemble, rejected stars with reasons, comparison curves.
    """
    cfg = cfg or PhotometryConfig()
    tid = target_id or target
    look = {} if relative or catalog is None else _catalog_lookup(catalog, band)
    if relative or catalog is None:
        colour_term = 0.0  # no colours to correct with
    if colour_term is None:
        c, _c_err, n_c = fit_colour_term(measurements, catalog, band, exclude=(tid,))
        colour_term = c if n_c >= 10 else 0.0
    c = float(colour_term)
    stars = _star_matrices(measurements, tid, look, c)
    nf = len(stars.frames)

    info = EnsembleInfo(colour_term=c)
    chosen = _choose_comparisons(stars, target, band, cfg, info, relative=relative)
    info.comparison_ids = sorted(chosen)
    info.ensemble_version = ensemble_version(chosen)
    rows_idx = [stars.index[s] for s in chosen]
    Ec = stars.err[rows_idx] if rows_idx else np.zeros((0, nf))
    Mc = stars.mag[rows_idx] if rows_idx else np.zeros((0, nf))
    # Nightly weights (fixed, so a missing star does not re-weight the others),
    # and each star's own level, so a missing star does not shift the ensemble.
    w = _weights(Ec)
    level = _levels(Mc, Ec, w)
    ens, ens_err, n_in = _ensemble(Mc, Ec, w, level)
    info.ensemble_mag = float((w * stars.cat_mag[rows_idx]).sum() / w.sum()) if w.sum() > 0 \
        else float("nan")
    mjds = _frame_column(measurements, "mjd", stars.frame_index, nf)
    info.curves = _comparison_curves(stars, chosen, w, mjds)

    # The target, frame by frame, in the comparisons' mean colour when its own is unknown.
    t_col = look.get(tid, (np.nan,) * 3)[2]
    known = stars.colours[rows_idx][np.isfinite(stars.colours[rows_idx])]
    t_col = t_col if np.isfinite(t_col) else (float(known.mean()) if len(known) else 0.0)
    rows = _target_rows(measurements, stars, c * t_col, ens, ens_err, n_in, info,
                        target=target, band=band, cfg=cfg, relative=relative)
    return rows, info


@dataclass(frozen=True)
class _StarMatrices:
    """Every star but the target as (star, frame) matrices, frames in order."""

    frames: np.ndarray  # frame numbers, sorted
    frame_index: dict[int, int]  # frame number -> column
    ids: list[str]  # star ids, sorted: the rows
    index: dict[str, int]  # star id -> row
    mag: np.ndarray  # colour-corrected instrumental mag; NaN: no usable measurement
    err: np.ndarray  # its error (mag)
    flags: np.ndarray  # photometry flags; -1: no row on that frame
    dist_px: np.ndarray  # distance to the target on the first frame it was usable
    colours: np.ndarray  # catalog colour; NaN: unknown
    cat_mag: np.ndarray  # catalog magnitude in the band; NaN: unknown
    target_rows: dict[int, int]  # column -> the target's row in the measurements


def _star_matrices(measurements: Table, tid: str, look: dict[str, tuple[float, float, float]],
                   colour_term: float) -> _StarMatrices:
    """The measurements of one target and band as :class:`_StarMatrices`."""
    frames = np.unique(np.asarray(measurements["frame"]))
    frames.sort()
    fidx = {int(f): k for k, f in enumerate(frames)}
    nf = len(frames)
    ids_all = np.array([str(s) for s in measurements["star_id"]])
    fr_all = np.array([fidx[int(f)] for f in measurements["frame"]])
    usable = _usable(measurements)

    star_list = sorted(set(ids_all) - {tid})
    sidx = {s: k for k, s in enumerate(star_list)}
    M = np.full((len(star_list), nf), np.nan)
    E = np.full((len(star_list), nf), np.nan)
    F = np.full((len(star_list), nf), -1, np.int64)  # flags; -1: no row on that frame
    dist = np.full(len(star_list), np.nan)
    tx = {fr: (x, y) for s, fr, x, y in zip(ids_all, fr_all, measurements["x_px"],
                                             measurements["y_px"], strict=True) if s == tid}
    for k in np.flatnonzero(ids_all != tid):
        F[sidx[ids_all[k]], fr_all[k]] = int(measurements["flags"][k])
    for k in np.flatnonzero(usable & (ids_all != tid)):
        s, fr = ids_all[k], fr_all[k]
        M[sidx[s], fr] = float(measurements["mag_inst"][k])
        E[sidx[s], fr] = float(measurements["mag_inst_err"][k])
        if fr in tx and not np.isfinite(dist[sidx[s]]):
            dist[sidx[s]] = math.hypot(float(measurements["x_px"][k]) - tx[fr][0],
                                       float(measurements["y_px"][k]) - tx[fr][1])
    colours = np.array([look.get(s, (np.nan,) * 3)[2] for s in star_list])
    cat_mag = np.array([look.get(s, (np.nan,) * 3)[0] for s in star_list])
    M = M - colour_term * np.nan_to_num(colours)[:, None]
    target_rows = {fr_all[k]: k for k in np.flatnonzero(ids_all == tid)}
    return _StarMatrices(frames, fidx, star_list, sidx, M, E, F, dist, colours, cat_mag,
                         target_rows)


def _choose_comparisons(stars: _StarMatrices, target: str, band: str, cfg: PhotometryConfig,
                        info: EnsembleInfo, *, relative: bool) -> list[str]:
    """The comparison ensemble: the configured list of this target, else the nearest
    fit candidates without the variable ones, at most ``max_comparison_stars``.
    Every star left out gets its reason in ``info``."""
    fixed = tuple(cfg.comparison_stars.get(target, ()))
    if fixed:
        info.fixed = True
        chosen = [s for s in fixed
                  if s in stars.index and np.isfinite(stars.mag[stars.index[s]]).any()]
        for s in fixed:
            if s not in chosen:
                info.rejected[s] = "not measured on any frame"
        return chosen
    chosen = _candidates(stars.mag, stars.err, stars.flags, stars.cat_mag, stars.colours,
                         stars.dist_px, stars.ids, band, cfg, info, need_catalog=not relative)
    chosen = _reject_variables(stars.mag, stars.err, chosen, stars.index, cfg, info)
    for s in chosen[cfg.max_comparison_stars:]:
        info.excluded[s] = f"a spare: the {cfg.max_comparison_stars} nearer ones suffice"
    return chosen[: cfg.max_comparison_stars]


def _comparison_curves(stars: _StarMatrices, chosen: list[str], w: np.ndarray,
                       mjds: list[float]) -> dict[str, list[tuple[float, float, float]]]:
    """Each comparison against the ensemble of the others, mean removed (for the plot):
    star id -> [(mjd, delta_mag, err)]."""
    M, E = stars.mag, stars.err
    curves = {}
    for s in chosen:
        k = stars.index[s]
        others = [stars.index[o] for o in chosen if o != s]
        if not others:
            continue
        w_o = np.array([w[chosen.index(o)] for o in chosen if o != s])
        e_o, ee_o, _ = _ensemble(M[others], E[others], w_o, _levels(M[others], E[others], w_o))
        d = M[k] - e_o
        if not np.isfinite(d).any():
            continue  # never on a frame with the others (a fixed list, the first frames)
        d = d - np.nanmean(d)
        err = np.hypot(E[k], ee_o)
        curves[s] = [(float(mjds[f]), float(d[f]), float(err[f]))
                     for f in range(len(d)) if np.isfinite(d[f])]
    return curves


def _target_rows(measurements: Table, stars: _StarMatrices, colour_corr_mag: float,
                 ens: np.ndarray, ens_err: np.ndarray, n_in: np.ndarray, info: EnsembleInfo,
                 *, target: str, band: str, cfg: PhotometryConfig,
                 relative: bool) -> list[dict]:
    """The rows of :func:`derive_lightcurve`: the target minus the ensemble, per frame.

    ``colour_corr_mag`` (colour term times the target's colour) is subtracted
    from the target's instrumental magnitude, as from every comparison's.
    """
    nf = len(stars.frames)
    meta = {name: _frame_column(measurements, name, stars.frame_index, nf)
            for name in ("mjd", "bjd_tdb", "airmass", "fwhm_arcsec")}
    rows: list[dict] = []
    comp_text = ";".join(info.comparison_ids)
    for fr in range(nf):
        k = stars.target_rows.get(fr)
        flags = int(measurements["flags"][k]) if k is not None else 0
        if k is None:
            mag_t, err_t, ap = np.nan, np.nan, np.nan
        else:
            mag_t = float(measurements["mag_inst"][k]) - colour_corr_mag
            err_t = float(measurements["mag_inst_err"][k])
            ap = float(measurements["aperture_px"][k])
        if n_in[fr] < cfg.comparison_min_stars:
            flags |= FEW_COMPARISONS
        diff = mag_t - ens[fr]
        diff_err = math.hypot(err_t, ens_err[fr]) if np.isfinite(ens_err[fr]) else np.nan
        rows.append({
            "frame": int(stars.frames[fr]), "target": target, "band": band,
            "mjd": meta["mjd"][fr], "bjd_tdb": meta["bjd_tdb"][fr],
            "mag": float(diff + info.ensemble_mag),
            "mag_err": float("nan") if relative else float(diff_err),
            "diff_mag": float(diff), "diff_mag_err": float(diff_err),
            "airmass": meta["airmass"][fr], "fwhm_arcsec": meta["fwhm_arcsec"][fr],
            "aperture_px": ap, "flags": flags,
            "ensemble_version": info.ensemble_version, "comparison_ids": comp_text,
            "n_comparisons": int(n_in[fr]),
        })
    return rows


def _frame_column(meas: Table, name: str, fidx: dict[int, int], nf: int) -> list[float]:
    out = np.full(nf, np.nan)
    if name in meas.colnames and len(meas):
        keys = np.fromiter(fidx.keys(), int, len(fidx))
        order = np.argsort(keys)
        where = np.fromiter(fidx.values(), int, len(fidx))[order]
        frames = np.asarray(meas["frame"], int)
        out[where[np.searchsorted(keys[order], frames)]] = np.asarray(meas[name], float)
    return out.tolist()


def _candidates(M: np.ndarray, E: np.ndarray, F: np.ndarray, cat_mag: np.ndarray,
                colours: np.ndarray, dist: np.ndarray, star_list: list[str], band: str,
                cfg: PhotometryConfig, info: EnsembleInfo, *,
                need_catalog: bool = True) -> list[str]:
    """Stars fit to compare with, nearest to the target first (paper 4.4).

    Every star that fails a test gets its reason in ``info.excluded``.
    ``need_catalog=False`` (a field without catalog) accepts stars that have no
    catalog magnitude or colour.
    """
    present = np.isfinite(M)
    with np.errstate(all="ignore"):
        med_err = np.array([np.median(E[k][present[k]]) if present[k].any() else np.inf
                            for k in range(len(E))])
    ok = np.zeros(len(star_list), bool)
    for k, s in enumerate(star_list):
        why = _exclusion(present[k], F[k], med_err[k], cat_mag[k], colours[k], band, cfg,
                         need_catalog)
        if why:
            info.excluded[s] = why
        else:
            ok[k] = True
    idx = np.flatnonzero(ok)
    # Near the target first: the same airmass, flat-field region and seeing.
    d = np.where(np.isfinite(dist[idx]), dist[idx], np.inf)
    idx = idx[np.argsort(d, kind="stable")]
    # A few spares, so that dropping a variable leaves a full ensemble.
    n_keep = cfg.max_comparison_stars + 4
    for k in idx[n_keep:]:
        info.excluded[star_list[k]] = f"farther from the target than {n_keep} candidates"
    return [star_list[k] for k in idx[:n_keep]]


def _exclusion(present: np.ndarray, flags: np.ndarray, med_err: float, cat_mag: float,
               colour: float, band: str, cfg: PhotometryConfig,
               need_catalog: bool = True) -> str:
    """Why a star cannot be a comparison ("" when it can)."""
    nf = len(present)

    def in_field(fr: int, which: str) -> str:
        if flags[fr] < 0:
            return f"not on the {which} frame"
        if flags[fr] & (EDGE | OFF_FRAME):
            return f"at the edge of the {which} frame"
        return ""

    if need_catalog and not (np.isfinite(cat_mag) and np.isfinite(colour)):
        return f"no catalog {band} magnitude or colour"
    # In the field on the first and the last frame so far (paper 4.4); a
    # passing flag there (a cosmic-ray hit) only drops that one point.
    why = in_field(0, "first") or in_field(nf - 1, "last")
    if why:
        return why
    if present.mean() < 0.8:
        seen = flags[(flags >= 0) & ~present]
        bits = 0
        for f in seen:
            bits |= int(f)
        names = "+".join(flag_names(bits)) or "unmeasured"
        return f"clean on only {int(present.sum())} of {nf} frames ({names})"
    if not med_err <= cfg.comparison_max_err_mag:
        return f"median error {med_err:.3f} mag > {cfg.comparison_max_err_mag}"
    return ""


def _weights(E: np.ndarray) -> np.ndarray:
    """Nightly weight of each star: 1 / its median error^2 (0 for a star never measured)."""
    out = np.zeros(len(E))
    if len(E) == 0:
        return out
    med = _row_medians(E)
    good = np.isfinite(med) & (med > 0)
    out[good] = 1 / med[good] ** 2
    return out


def _row_medians(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=1)`` (NaN for a row without values), without its
    masked-array path, which is slow on the small arrays of a light curve."""
    a = np.asarray(a, float)
    if a.ndim != 2 or a.shape[1] == 0:
        return np.full(len(a), np.nan)
    n = np.isfinite(a).sum(axis=1)
    s = np.sort(a, axis=1)  # NaN sort last
    rows = np.arange(len(a))
    out = (s[rows, np.maximum((n - 1) // 2, 0)] + s[rows, np.minimum(n // 2, a.shape[1] - 1)]) / 2
    out[n == 0] = np.nan
    return out


def _levels(M: np.ndarray, E: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Each star's mean offset from the weighted ensemble (frames where all are present)."""
    if len(M) == 0:
        return np.zeros(0)
    level = np.zeros(len(M))
    if not w.sum() > 0:
        return level
    for _ in range(3):
        ens, _e, _n = _ensemble(M, E, w, level)
        diff = M - ens[None, :]
        seen = np.isfinite(diff)
        n_seen = seen.sum(axis=1)
        level = np.where(seen, diff, 0.0).sum(axis=1) / np.maximum(n_seen, 1)
        level[n_seen == 0] = 0.0
        level -= (w * level).sum() / w.sum()
    return level


def _ensemble(M: np.ndarray, E: np.ndarray, w: np.ndarray,
              level: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted ensemble magnitude per frame, its error and the stars used."""
    nf = M.shape[1]
    if len(M) == 0:
        nan = np.full(nf, np.nan)
        return nan, nan, np.zeros(nf, int)
    present = np.isfinite(M) & (w[:, None] > 0)
    W = np.where(present, w[:, None], 0.0)
    wsum = W.sum(axis=0)
    adj = np.where(present, M - level[:, None], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ens = (W * adj).sum(axis=0) / wsum
        err = np.sqrt((W**2 * np.where(present, E, 0.0) ** 2).sum(axis=0)) / wsum
    ens = np.where(wsum > 0, ens, np.nan)
    err = np.where(wsum > 0, err, np.nan)
    return ens, err, present.sum(axis=0)


def _reject_variables(M: np.ndarray, E: np.ndarray, chosen: list[str], sidx: dict[str, int],
                      cfg: PhotometryConfig, info: EnsembleInfo) -> list[str]:
    """Drop, worst first, comparisons whose curve against the others is not flat."""
    chosen = list(chosen)
    while len(chosen) >= 3:
        chi = {}
        for s in chosen:
            k = sidx[s]
            others = [sidx[o] for o in chosen if o != s]
            w_o = _weights(E[others])
            ens, ens_err, _ = _ensemble(M[others], E[others], w_o,
                                        _levels(M[others], E[others], w_o))
            d = M[k] - ens
            err = np.hypot(E[k], ens_err)
            ok = np.isfinite(d) & np.isfinite(err)
            if ok.sum() < 3:
                chi[s] = float("nan")  # too few frames to judge yet
                continue
            wd = 1 / err[ok] ** 2
            mean = (wd * d[ok]).sum() / wd.sum()
            chi[s] = float((wd * (d[ok] - mean) ** 2).sum() / (ok.sum() - 1))
        info.chi2.update(chi)
        judged = [s for s in chosen if np.isfinite(chi[s])]
        if not judged:
            break
        worst = max(judged, key=lambda s: chi[s])
        if chi[worst] <= cfg.comparison_max_chi2:
            break
        info.rejected[worst] = f"variable: chi2/dof {chi[worst]:.1f} against the ensemble"
        chosen.remove(worst)
    return chosen
