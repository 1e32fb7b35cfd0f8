"""The processing of one frame, step by step, in the order a reader expects.

Science frame::

    read -> headers -> calibrate -> detect -> solve (quality gate) -> write -> photometry

Calibration frame::

    read -> headers -> write          (then the main process rebuilds the master)

Each step is a plain function of the few values it needs; this module only
strings them together, times them and turns a rejection into a state and a
reason. Workers run :func:`process_science` and :func:`process_calibration`
in a process pool and return a :class:`FrameResult`; they never touch the
store (the main process alone writes it).
"""

from __future__ import annotations

import errno
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from photd import __version__
from photd.config import Config
from photd.obslog import LogEntry

SCIENCE_STEPS = ("read", "headers", "calibrate", "detect", "solve", "write", "photometry")

#: ``solutions.relative``: 0 solved against the catalog; 1 registered to the
#: series' reference frame (no catalog covers the field); 2 the reference frame
#: itself (its solution header holds the reference under ``relative_reference``).
RELATIVE_REGISTERED = 1
RELATIVE_REFERENCE = 2
CALIBRATION_STEPS = ("read", "headers", "write")


class FrameRejected(Exception):
    """A step refused the frame: ``state`` and ``reason`` go to the store."""

    def __init__(self, state: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.state = state
        self.reason = reason


@dataclass(frozen=True)
class Masters:
    """The master calibrations a science frame is calibrated with."""

    bias: str | None = None
    flat: str | None = None
    dark: str | None = None
    version: str = "uncalibrated"  # e.g. "2016-11-01 bias v10 flat v10"
    provisional: bool = True  # not this night's final masters


@dataclass(frozen=True)
class FrameTask:
    """What a worker needs to process one frame."""

    frame_id: int
    raw_path: str
    out_path: str
    band: str
    frame_number: int
    night: str
    entry: LogEntry
    cfg: Config
    masters: Masters = field(default_factory=Masters)
    gain_e_per_adu: float | None = None
    rdnoise_e: float | None = None
    target_radec: tuple[float, float] | None = None
    stars: Table | None = None  # reference stars around the pointing (catalog cone)
    # No catalog covers the field: register to the series' reference frame instead
    # (``reference`` None: this frame becomes the reference; see relative_reference).
    relative: bool = False
    reference: dict[str, Any] | None = None


@dataclass
class FrameResult:
    """What a worker hands back to the main process."""

    frame_id: int
    state: str
    reason: str | None = None
    message: str = ""
    output: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    solution: dict[str, Any] | None = None
    measurements: list[dict[str, Any]] = field(default_factory=list)
    zeropoint: dict[str, Any] | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers (for pickling to the main process and SQLite)."""
    return value.item() if hasattr(value, "item") else value


@contextmanager
def _step(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 4)


# --------------------------------------------------------------------------- steps


def warm_up() -> None:
    """Pool initializer: pay the one-time imports and astropy set-up before frames come.

    Without it the first frame of every worker spends over a second in the
    header step (coordinate frames, IERS tables), which is latency an observer sees.
    """
    try:
        from astropy.time import Time

        from photd import astrometry, calibration, lightcurve, photometry  # noqa: F401
        from photd.config import SiteConfig
        from photd.headers import airmass

        airmass(10.0, 20.0, Time("2020-01-01T12:00:00", scale="utc"), SiteConfig())
    except Exception:  # noqa: BLE001 - a warm-up must never stop a worker from starting
        pass


def read_raw(path: str) -> tuple[np.ndarray, fits.Header]:
    """The raw frame's pixels (float32 ADU) and header; the file is opened read-only."""
    try:
        with fits.open(path, mode="readonly", memmap=False) as hdul:
            hdu = hdul[0]
            if hdu.data is None or hdu.header.get("NAXIS") != 2:
                raise FrameRejected("failed", "not_an_image",
                                    f"{path}: primary HDU is not a 2-D image "
                                    f"(NAXIS={hdu.header.get('NAXIS')})")
            return np.asarray(hdu.data, dtype=np.float32), hdu.header.copy()
    except (OSError, ValueError) as exc:
        raise FrameRejected("failed", "unreadable", f"{path}: {exc}") from exc


def rebuild_header(task: FrameTask, raw_header: fits.Header, history: list[str]) -> fits.Header:
    """Paper Table 2 header for this frame (pointing, site, exposure, WCS guess)."""
    from photd.headers import build_header

    entry = task.entry
    if task.target_radec is not None and not entry.has_coordinates:
        # The log had no coordinates; the name was resolved (SIMBAD via the cache).
        from dataclasses import replace

        entry = replace(entry, ra_deg=task.target_radec[0], dec_deg=task.target_radec[1])
    return build_header(raw_header, entry, task.band, task.cfg,
                        frame_number=task.frame_number, binning=None,
                        gain_e_per_adu=task.gain_e_per_adu, rdnoise_e=task.rdnoise_e,
                        history=history)


@lru_cache(maxsize=12)
def _master(path: str, mtime: float) -> np.ndarray:
    from photd.calibration import read_master

    return read_master(path)[0]


def load_master(path: str | None) -> np.ndarray | None:
    """A master calibration's pixels, cached per worker process."""
    if not path:
        return None
    return _master(path, Path(path).stat().st_mtime)


def guess_wcs(header: fits.Header) -> WCS:
    """The WCS the rebuilt header predicts from the log's pointing and the config scale."""
    return WCS(header, naxis=2)


#: Reference detections kept for registering later frames (brightest first).
_REFERENCE_SOURCES = 300
#: Stars of a relative series' star list (bright, unsaturated, isolated).
_REFERENCE_STARS = 80


def relative_reference(sources: Table, guess: WCS, *, band: str, frame_id: int,
                       frame_number: int, target_radec: tuple[float, float],
                       fwhm_px: float, cfg: Any) -> dict[str, Any]:
    """Make a frame the reference of its series when no catalog covers the field.

    Its WCS is the header's guess (log pointing, configured scale and rotation):
    right in scale and rotation to the configuration's accuracy, off in absolute
    position by the telescope's pointing error, hence "relative". Its own
    detections become the star list (:func:`photd.catalog.catalog_from_sources`).

    The target cannot be told from a field star without a catalog; it is taken
    to be the detection nearest to where the header puts the log's coordinates.
    That is right when the pointing error is smaller than the distance from the
    target to its nearest detected neighbour; ``target_sep_arcsec`` (how far
    the chosen source is from the predicted place) and ``runner_up_arcsec``
    (how far the next one is) are kept as the evidence.

    Returns a JSON-able dict: ``id`` (hash of the content), ``frame_id``,
    ``frame_number``, ``wcs`` (header cards), ``sources`` (columns ``x``, ``y``,
    ``flux``), ``stars`` (columns ``id``, ``ra``, ``dec``), ``target_radec``
    (where the target is measured, in this relative WCS), ``target_sep_arcsec``
    and ``runner_up_arcsec`` (NaN when there is none).
    """
    import hashlib
    import json

    from photd import astrometry
    from photd.catalog import catalog_from_sources

    astrometry.check_sources(sources, fwhm_px, cfg)  # clouds, a double exposure, trailing
    usable = sources[~np.asarray(sources["sharp"], bool) & ~np.asarray(sources["saturated"], bool)]
    if len(usable) < 2 * cfg.min_matches:
        raise astrometry.BadFit("too_few_sources",
                                f"{len(usable)} star-like sources: too few for the reference "
                                f"frame of a field without a catalog (need {2 * cfg.min_matches})")
    usable = usable[:_REFERENCE_SOURCES]
    stars = catalog_from_sources(usable, guess, band=band, max_stars=_REFERENCE_STARS)
    # The target: the detection nearest to the log's coordinates through the guess.
    tx, ty = guess.all_world2pix([target_radec[0]], [target_radec[1]], 0)
    scale = astrometry.wcs_scale_arcsec(guess)
    d = np.hypot(np.asarray(usable["x"], float) - tx[0],
                 np.asarray(usable["y"], float) - ty[0]) * scale
    order = np.argsort(d)
    sep = float(d[order[0]])
    runner_up = float(d[order[1]]) if len(order) > 1 else float("nan")
    if sep <= cfg.max_offset_arcmin * 60.0:
        k = int(order[0])
        ra, dec = guess.all_pix2world([usable["x"][k]], [usable["y"][k]], 0)
        measure_at = (float(ra[0]), float(dec[0]))
    else:
        measure_at = (float(target_radec[0]), float(target_radec[1]))
    ref: dict[str, Any] = {
        "frame_id": int(frame_id), "frame_number": int(frame_number),
        "wcs": {k: _plain(v) for k, v in guess.to_header(relax=True).items()},
        "sources": {c: [_plain(v) for v in usable[c]] for c in ("x", "y", "flux")},
        "stars": {"id": [str(v) for v in stars["id"]],
                  "ra": [float(v) for v in stars["ra"]],
                  "dec": [float(v) for v in stars["dec"]]},
        "target_radec": list(measure_at), "target_sep_arcsec": sep,
        "runner_up_arcsec": runner_up}
    ref["id"] = hashlib.sha1(json.dumps(ref, sort_keys=True).encode()).hexdigest()[:12]
    return ref


def register_relative(sources: Table, reference: dict[str, Any], *, shape: tuple[int, int],
                      fwhm_px: float, cfg: Any) -> Any:
    """A frame's WCS in its series' relative system (registered to the reference frame)."""
    from photd import astrometry

    ref_wcs = WCS(fits.Header(reference["wcs"]), naxis=2)
    ref_sources = Table(reference["sources"])
    ref_sources["sharp"] = np.zeros(len(ref_sources), bool)
    ref_sources["saturated"] = np.zeros(len(ref_sources), bool)
    return astrometry.relative_solution(sources, ref_sources, ref_wcs, shape=shape, cfg=cfg,
                                        fwhm_px=fwhm_px)


def reference_stars(reference: dict[str, Any]) -> Table:
    """The star list of a relative series: ``id``, ``ra``, ``dec`` and no magnitudes."""
    stars = Table(reference["stars"])
    for band in ("g", "r", "i"):
        stars[band] = np.full(len(stars), np.nan)
    return stars


# --------------------------------------------------------------------------- flows


def _record_exception(result: FrameResult, exc: Exception) -> None:
    """Turn what stopped a frame into its state and reason (the daemon goes on)."""
    if isinstance(exc, FrameRejected):
        result.state, result.reason, result.message = exc.state, exc.reason, str(exc)
    elif isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # A full work disk is the daemon's problem, not the frame's: the atomic write
        # left nothing behind; 'arrived' is taken up again by the next rescan, and
        # intake pauses while the disk stays full.
        result.state, result.reason, result.output = "arrived", "disk_full", None
        result.message = f"work disk full while writing: {exc}"
    else:
        result.state, result.reason = "failed", type(exc).__name__
        result.message = f"{exc}\n{traceback.format_exc(limit=6)}"


def process_calibration(task: FrameTask) -> FrameResult:
    """Rebuild a calibration frame's header and store the header-fixed copy."""
    from photd.headers import write_processed

    result = FrameResult(task.frame_id, "calibration")
    t = result.timings
    try:
        with _step(t, "read"):
            _data, raw_header = read_raw(task.raw_path)
        with _step(t, "headers"):
            header = rebuild_header(task, raw_header, [])
        with _step(t, "write"):
            out = write_processed(task.raw_path, task.out_path, header,
                                  compress=task.cfg.output.compress)
        result.output = str(out)
    except Exception as exc:  # a bug or an unexpected file must stop this frame only
        _record_exception(result, exc)
    return result


def process_science(task: FrameTask) -> FrameResult:
    """Headers, calibration, astrometry and photometry of one science frame."""
    from photd import astrometry, calibration, photometry
    from photd.headers import set_wcs, write_processed

    cfg = task.cfg
    cam = cfg.camera(task.band)
    result = FrameResult(task.frame_id, "done")
    t = result.timings
    history: list[str] = []
    try:
        with _step(t, "read"):
            data, raw_header = read_raw(task.raw_path)
        with _step(t, "headers"):
            header = rebuild_header(task, raw_header, [])
        exptime_s = float(header["EXPTIME"])

        with _step(t, "calibrate"):
            bias = load_master(task.masters.bias)
            flat = load_master(task.masters.flat)
            dark = load_master(task.masters.dark)
            if bias is not None and bias.shape != data.shape and not task.masters.provisional:
                # Tonight's masters fit tonight's frames: another size is another camera
                # (or a corrupt file), and a median-subtracted frame would measure nonsense.
                raise FrameRejected("failed", "wrong_shape",
                                    f"frame is {data.shape[::-1]} px (nx, ny), the "
                                    f"{task.masters.version} masters are {bias.shape[::-1]}")
            if bias is not None and bias.shape == data.shape:
                calibrated, mask = calibration.calibrate(
                    data, master_bias=bias, master_flat=flat, master_dark=dark,
                    exptime_s=exptime_s, saturation_adu=cam.saturation_adu,
                    nonlinearity_adu=cam.nonlinearity_adu, overscan=cam.overscan,
                    trim=cam.trim)
            else:
                # No usable master: subtract a robust level so the frame still
                # flows; the measurement is flagged by its calibration version.
                calibrated = data - np.float32(np.median(data))
                mask = data >= cam.saturation_adu
            history.append(f"calibrated with {task.masters.version}")

        if task.entry.ra_deg is None and task.target_radec is None:
            raise FrameRejected("waiting_log", "no_coordinates",
                                f"log line {task.entry.line_no} gives no coordinates for "
                                f"{task.entry.name!r} and the name could not be resolved")
        ra0 = task.entry.ra_deg if task.entry.ra_deg is not None else task.target_radec[0]
        dec0 = task.entry.dec_deg if task.entry.dec_deg is not None else task.target_radec[1]
        if (task.stars is None or len(task.stars) == 0) and not task.relative:
            raise FrameRejected("waiting_catalog", "catalog_unavailable",
                                "no reference stars for this field (no local catalog, "
                                "nothing cached)")
        with _step(t, "detect"):
            binning = int(header.get("XBINNING", 1) or 1)
            sources, bg_rms, fwhm_px = astrometry.detect_sources(
                calibrated, mask, detect_sigma=cfg.astrometry.detect_sigma,
                saturation=cam.saturation_adu)
        reference = task.reference
        with _step(t, "solve"):
            stars = task.stars
            try:
                if not task.relative:
                    sol = astrometry.solve(sources, stars, guess=guess_wcs(header),
                                           shape=calibrated.shape, cfg=cfg.astrometry)
                elif reference is None:  # the series' first frame: the others follow it
                    guess = guess_wcs(header)
                    reference = relative_reference(
                        sources, guess, band=task.band, frame_id=task.frame_id,
                        frame_number=task.frame_number,
                        target_radec=task.target_radec or (ra0, dec0), fwhm_px=float(fwhm_px),
                        cfg=cfg.astrometry)
                    sol = astrometry.Solution(
                        wcs=guess, n_matches=len(reference["sources"]["x"]),
                        rms_arcsec=float("nan"), scale_arcsec=astrometry.wcs_scale_arcsec(guess),
                        rotation_deg=astrometry.wcs_rotation_deg(guess), offset_arcsec=0.0,
                        matches=Table(), relative=True)
                else:
                    sol = register_relative(sources, reference, shape=calibrated.shape,
                                            fwhm_px=float(fwhm_px), cfg=cfg.astrometry)
            except astrometry.BadFit as exc:
                raise FrameRejected("badfit", exc.reason, str(exc)) from exc
            if task.relative:
                stars = reference_stars(reference)
        set_wcs(header, sol.wcs)  # one WCS in the header: the fit, not the guess beside it
        header["NMATCH"] = (sol.n_matches, "reference frame sources matched" if task.relative
                            else "catalog stars matched")
        if np.isfinite(sol.rms_arcsec):
            header["WCSRMS"] = (round(sol.rms_arcsec, 4), "[arcsec] WCS fit residual")
        header["FWHM"] = (round(float(fwhm_px), 3), "[px] median FWHM of stars")
        wcs_cards = {k: header[k] for k in sol.wcs.to_header(relax=True)}
        if task.relative:
            # No catalog: positions are relative to the reference frame's header guess,
            # whose absolute error is the telescope's pointing error.
            header["WCSREL"] = (True, "WCS relative: no catalog, pointing-error offset")
            header["WCSREF"] = (reference["frame_number"], "frame the WCS is registered to")
            history.append(f"relative WCS: registered to frame {reference['frame_number']} "
                           f"({sol.n_matches} sources), no catalog for this field")
            wcs_cards.update(WCSREL=True, RELREFID=reference["id"])
        else:
            history.append(f"WCS: {sol.n_matches} matches, rms {sol.rms_arcsec:.3f} arcsec")
        is_reference = task.relative and reference["frame_id"] == task.frame_id
        if is_reference:
            wcs_cards["relative_reference"] = reference  # kept in the store with the frame
        result.solution = {"n_sources": len(sources), "n_matches": sol.n_matches,
                           "rms_arcsec": sol.rms_arcsec if np.isfinite(sol.rms_arcsec) else None,
                           "scale_arcsec": sol.scale_arcsec,
                           "rotation_deg": sol.rotation_deg, "fwhm_px": float(fwhm_px),
                           "relative": RELATIVE_REFERENCE if is_reference
                           else RELATIVE_REGISTERED if task.relative else 0,
                           "header": wcs_cards}
        with _step(t, "write"):
            for line in history:
                header.add_history(f"photd {__version__}: {line}")
            out = write_processed(task.raw_path, task.out_path, header,
                                  compress=cfg.output.compress)
            result.output = str(out)
        with _step(t, "photometry"):
            from dataclasses import asdict

            from photd import lightcurve

            gain = task.gain_e_per_adu or 1.0
            rdnoise = task.rdnoise_e or 0.0
            target = task.target_radec or (ra0, dec0)
            # relative: where the reference frame's source taken for the target is
            measure_at = tuple(reference["target_radec"]) if task.relative else target
            table, summary = photometry.measure_frame(
                calibrated * np.float32(gain), wcs=sol.wcs, stars=stars,
                target_radec=measure_at, target_name=task.entry.name, fwhm_px=float(fwhm_px),
                exptime_s=exptime_s, gain_e_per_adu=gain, rdnoise_e=rdnoise, mask=mask,
                cfg=cfg.photometry)
            zp = lightcurve.zero_point(table, stars, task.band, exclude=(task.entry.name,))
            table = lightcurve.calibrate(table, zp, stars, task.band)
            mjd_mid, bjd_tdb = lightcurve.times(header["DATE-OBS"], exptime_s, target[0],
                                                target[1], cfg.site)
            airmass = header.get("AIRMASS")
            result.zeropoint = None if task.relative else {
                "zp": zp.zp, "zp_err": zp.zp_err, "n_stars": zp.n_stars,
                "scatter": zp.scatter, "colour_term": zp.colour_term}
            result.measurements = [
                {**{k: _plain(row[k]) for k in table.colnames}, "target": task.entry.name,
                 "band": task.band, "mjd_mid": mjd_mid, "bjd_tdb": bjd_tdb,
                 "fwhm_px": float(fwhm_px), "airmass": airmass}
                for row in table]
            result.summary = asdict(summary)
            result.summary.update(binning=binning, bg_rms=float(bg_rms),
                                  scale_arcsec=sol.scale_arcsec)
    except Exception as exc:  # a bug or an unexpected file must stop this frame only
        _record_exception(result, exc)
    return result
