"""The processing of one frame, step by step, in the order a reader expects.

Science frame (:data:`SCIENCE_STEPS`)::

    read -> headers -> calibrate -> detect -> solve (quality gate) -> write -> photometry

Calibration frame (:data:`CALIBRATION_STEPS`)::

    read -> headers -> write          (then the main process rebuilds the master)

Master calibration (:func:`process_master`)::

    combine the night's calibration frames -> write -> gain and read noise (flats)

Each step is a plain function of the few values it needs; this module only
strings them together, times them and turns a :class:`~photd.errors.FrameStop`
into a state and a reason. Workers run :func:`process_science`,
:func:`process_calibration` and :func:`process_master` in a process pool and
return what they found; they never touch the store (the main process alone
writes it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from photd import __version__, astrometry, calibration, lightcurve, photometry, targets
from photd.catalog import catalog_from_sources
from photd.config import Config, SiteConfig
from photd.errors import FrameRejected, FrameStop, WaitForCatalog, WaitForLog
from photd.flags import TARGET_AMBIGUOUS, TARGET_NOT_FOUND
from photd.headers import airmass, build_header, set_wcs, write_processed
from photd.obslog import LogEntry

__all__ = ["SCIENCE_STEPS", "CALIBRATION_STEPS", "FrameRejected", "FrameResult", "FrameTask",
           "MasterTask", "Masters", "RelativeReference", "process_calibration",
           "process_master", "process_science"]

SCIENCE_STEPS = ("read", "headers", "calibrate", "detect", "solve", "write", "photometry")
CALIBRATION_STEPS = ("read", "headers", "write")

#: ``solutions.relative``: 0 solved against the catalog; 1 registered to the
#: series' reference frame (no catalog covers the field); 2 the reference frame
#: itself (its solution header holds the reference under ``relative_reference``).
RELATIVE_REGISTERED = 1
RELATIVE_REFERENCE = 2

#: Gain (e-/ADU) for judging dark current before the night's flats measure it.
NOMINAL_GAIN_E_PER_ADU = 1.6


@dataclass(frozen=True)
class Masters:
    """The master calibrations a science frame is calibrated with."""

    bias: str | None = None
    flat: str | None = None
    dark: str | None = None
    version: str = "uncalibrated"  # e.g. "2016-11-01 bias v10 flat v10"
    provisional: bool = True  # not this night's final masters


@dataclass(frozen=True)
class RelativeReference:
    """The reference frame of a field no catalog covers (see :func:`relative_reference`).

    Stored as JSON with the reference frame's solution (``relative_reference``
    in its header); :meth:`to_json` and :meth:`from_json` keep that format.
    """

    id: str  # hash of the content: frames registered to it carry it as RELREFID
    frame_id: int
    frame_number: int
    wcs: dict[str, Any]  # header cards of the reference frame's WCS
    sources: dict[str, list]  # columns x, y, flux of its detections
    stars: dict[str, list]  # the series' star list: columns id, ra, dec
    target_radec: tuple[float, float]  # where the target is measured, in this WCS
    target_sep_arcsec: float  # how far that source is from the predicted place
    runner_up_arcsec: float  # how far the next one is (NaN when there is none)

    def to_json(self) -> dict[str, Any]:
        """The stored form (keys and order as the store has always held them)."""
        out = {"frame_id": self.frame_id, "frame_number": self.frame_number, "wcs": self.wcs,
               "sources": self.sources, "stars": self.stars,
               "target_radec": list(self.target_radec),
               "target_sep_arcsec": self.target_sep_arcsec,
               "runner_up_arcsec": self.runner_up_arcsec}
        out["id"] = self.id
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RelativeReference:
        return cls(id=d["id"], frame_id=d["frame_id"], frame_number=d["frame_number"],
                   wcs=d["wcs"], sources=d["sources"], stars=d["stars"],
                   target_radec=tuple(d["target_radec"]),
                   target_sep_arcsec=d["target_sep_arcsec"],
                   runner_up_arcsec=d["runner_up_arcsec"])

    @property
    def n_sources(self) -> int:
        return len(self.sources["x"])


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
    reference: RelativeReference | None = None
    # Where the target is measured (photd.targets): the night's decision, or the
    # best prior position when none is decided yet (the worker refines it on
    # this frame's detections and returns the evidence in FrameResult.target).
    target: targets.TargetPosition | None = None
    target_status: str | None = None  # the decision's status; None: refine here


@dataclass(frozen=True)
class MasterTask:
    """What a worker needs to rebuild one master calibration."""

    kind: str  # bias, flat or dark
    band: str
    night: str
    version: int
    inputs: tuple[str, ...]  # the header-fixed calibration frames to combine
    out_path: str
    cfg: Config
    bias_path: str | None = None  # the master bias flats and darks are built against
    bias_frames: tuple[str, ...] = ()  # the night's biases, for gain and read noise


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
    target: dict[str, Any] | None = None  # this frame's refinement of the target position


def _plain(value: Any) -> Any:
    """numpy scalars to Python numbers (for pickling to the main process and SQLite)."""
    return value.item() if hasattr(value, "item") else value


class _Steps:
    """Times each step into ``timings`` and checks they run in the declared order."""

    def __init__(self, timings: dict[str, float], order: tuple[str, ...]) -> None:
        self.timings = timings
        self.order = order

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        expected = self.order[len(self.timings)] if len(self.timings) < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"step {name!r} out of order: expected {expected!r} "
                               f"(steps {', '.join(self.order)})")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 4)


# --------------------------------------------------------------------------- flows


def process_science(task: FrameTask) -> FrameResult:
    """Headers, calibration, astrometry and photometry of one science frame."""
    result = FrameResult(task.frame_id, "done")
    step = _Steps(result.timings, SCIENCE_STEPS)
    try:
        with step("read"):
            data, raw_header = read_raw(task.raw_path)
        with step("headers"):
            header = rebuild_header(task, raw_header, [])
        exptime_s = float(header["EXPTIME"])
        with step("calibrate"):
            calibrated, mask = calibrate_frame(data, exptime_s, task)
        target = require_pointing_and_stars(task)
        with step("detect"):
            sources, bg_rms, fwhm_px = detect(calibrated, mask, task)
        with step("solve"):
            sol, stars, reference = solve_frame(sources, header, calibrated.shape, target,
                                                float(fwhm_px), task)
        history = [f"calibrated with {task.masters.version}"]
        result.solution = record_solution(header, sol, reference, sources, float(fwhm_px),
                                          task, history)
        with step("write"):
            result.output = write_frame(header, history, task)
        with step("photometry"):
            target, result.target = locate_target(sources, sol, target, float(fwhm_px), task)
            result.zeropoint, result.measurements, summary = measure(
                calibrated, mask, header, exptime_s, sol, stars, target, reference,
                float(fwhm_px), task, (result.target or {}).get("status", task.target_status))
        result.summary = {**asdict(summary), "binning": int(header.get("XBINNING", 1) or 1),
                          "bg_rms": float(bg_rms), "scale_arcsec": sol.scale_arcsec}
    except Exception as exc:  # a bug or an unexpected file must stop this frame only
        _record_exception(result, exc)
    return result


def process_calibration(task: FrameTask) -> FrameResult:
    """Rebuild a calibration frame's header and store the header-fixed copy."""
    result = FrameResult(task.frame_id, "calibration")
    step = _Steps(result.timings, CALIBRATION_STEPS)
    try:
        with step("read"):
            _data, raw_header = read_raw(task.raw_path)
        with step("headers"):
            header = rebuild_header(task, raw_header, [])
        with step("write"):
            out = write_processed(task.raw_path, task.out_path, header,
                                  compress=task.cfg.output.compress)
        result.output = str(out)
    except Exception as exc:  # a bug or an unexpected file must stop this frame only
        _record_exception(result, exc)
    return result


def process_master(task: MasterTask) -> dict:
    """Combine a night's calibration frames into a new master version; write it.

    Returns ``path``, ``inputs``, ``rejected`` (input -> (reason, message)) and
    ``elapsed_s``; for a flat with two biases and two flats also ``gain``,
    ``rdnoise`` and ``gain_inputs`` (paper 4.2). On failure ``error`` and
    ``reason``: the master keeps its previous version.
    """
    t0 = time.perf_counter()
    cfg, cam = task.cfg, task.cfg.camera(task.band)
    try:
        bias = calibration.read_master(task.bias_path)[0] if task.bias_path else None
        exptimes = None
        if task.kind == "dark":
            exptimes = [float(fits.getheader(p).get("EXPTIME", 0.0)) for p in task.inputs]
            if dark_is_negligible(list(task.inputs), bias, exptimes, cam):
                return {"error": "dark current negligible; darks not applied",
                        "reason": "dark_negligible"}
        res = calibration.build_master(task.kind, list(task.inputs), cfg=cfg.calibration,
                                       cam=cam, master_bias=bias, exptimes_s=exptimes)
        written = calibration.write_master(task.out_path, res.data, kind=task.kind,
                                           band=task.band, night=task.night,
                                           version=task.version, inputs=res.inputs)
        out: dict[str, Any] = {
            "path": str(written), "inputs": list(res.inputs),
            "rejected": {p: (r.reason, r.message) for p, r in res.rejected.items()},
            "elapsed_s": round(time.perf_counter() - t0, 3)}
        if task.kind == "flat" and len(task.bias_frames) >= 2 and len(res.inputs) >= 2:
            out.update(gain_readnoise(list(task.bias_frames), list(res.inputs)))
        return out
    except Exception as exc:  # the master keeps its previous version
        return {"error": str(exc), "reason": getattr(exc, "reason", type(exc).__name__)}


def _record_exception(result: FrameResult, exc: Exception) -> None:
    """Turn what stopped a frame into its state and reason (the daemon goes on)."""
    if isinstance(exc, FrameStop):
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


# --------------------------------------------------------------------------- steps


def warm_up() -> None:
    """Pool initializer: pay the one-time astropy set-up before frames come.

    Without it the first frame of every worker spends over a second in the
    header step (coordinate frames, IERS tables), which is latency an observer sees.
    """
    try:
        airmass(10.0, 20.0, Time("2020-01-01T12:00:00", scale="utc"), SiteConfig())
    except Exception:  # noqa: BLE001 - a warm-up must never stop a worker from starting
        pass


def read_raw(path: str) -> tuple[np.ndarray, fits.Header]:
    """The raw frame's pixels (float32 ADU) and header; the file is opened read-only."""
    try:
        with fits.open(path, mode="readonly", memmap=False) as hdul:
            hdu = hdul[0]
            if hdu.data is None or hdu.header.get("NAXIS") != 2:
                raise FrameRejected("not_an_image",
                                    f"{path}: primary HDU is not a 2-D image "
                                    f"(NAXIS={hdu.header.get('NAXIS')})")
            return np.asarray(hdu.data, dtype=np.float32), hdu.header.copy()
    except (OSError, ValueError) as exc:
        raise FrameRejected("unreadable", f"{path}: {exc}") from exc


def rebuild_header(task: FrameTask, raw_header: fits.Header, history: list[str]) -> fits.Header:
    """Paper Table 2 header for this frame (pointing, site, exposure, WCS guess)."""
    entry = task.entry
    if task.target_radec is not None and not entry.has_coordinates:
        # The log had no coordinates; the name was resolved (SIMBAD via the cache).
        entry = replace(entry, ra_deg=task.target_radec[0], dec_deg=task.target_radec[1])
    return build_header(raw_header, entry, task.band, task.cfg,
                        frame_number=task.frame_number, binning=None,
                        gain_e_per_adu=task.gain_e_per_adu, rdnoise_e=task.rdnoise_e,
                        history=history)


@lru_cache(maxsize=12)
def _master(path: str, mtime: float) -> np.ndarray:
    return calibration.read_master(path)[0]


def load_master(path: str | None) -> np.ndarray | None:
    """A master calibration's pixels, cached per worker process."""
    if not path:
        return None
    return _master(path, Path(path).stat().st_mtime)


def calibrate_frame(data: np.ndarray, exptime_s: float,
                    task: FrameTask) -> tuple[np.ndarray, np.ndarray]:
    """The frame minus bias (and dark), divided by the flat; and its bad-pixel mask."""
    cam = task.cfg.camera(task.band)
    data = mask_non_finite(data, cam.saturation_adu)
    bias = load_master(task.masters.bias)
    flat = load_master(task.masters.flat)
    dark = load_master(task.masters.dark)
    if bias is not None and bias.shape != data.shape and not task.masters.provisional:
        # Tonight's masters fit tonight's frames: another size is another camera
        # (or a corrupt file), and a median-subtracted frame would measure nonsense.
        raise FrameRejected("wrong_shape",
                            f"frame is {data.shape[::-1]} px (nx, ny), the "
                            f"{task.masters.version} masters are {bias.shape[::-1]}")
    if bias is not None and bias.shape == data.shape:
        return calibration.calibrate(
            data, master_bias=bias, master_flat=flat, master_dark=dark,
            exptime_s=exptime_s, saturation_adu=cam.saturation_adu,
            nonlinearity_adu=cam.nonlinearity_adu, overscan=cam.overscan, trim=cam.trim)
    # No usable master: subtract a robust level so the frame still flows; the
    # measurement is flagged by its calibration version.
    return data - np.float32(np.median(data)), data >= cam.saturation_adu


def mask_non_finite(data: np.ndarray, saturation_adu: float) -> np.ndarray:
    """NaN and Inf pixels (a float camera's dead pixels) set to the saturation level.

    Set there, they are masked exactly like saturated pixels at every step
    (trimming included) instead of failing the frame in a median or a fit.
    """
    bad = ~np.isfinite(data)
    if not bad.any():
        return data
    return np.where(bad, np.float32(saturation_adu), data)


def require_pointing_and_stars(task: FrameTask) -> tuple[float, float]:
    """The target's coordinates; the frame waits without them or without reference stars."""
    entry = task.entry
    if entry.ra_deg is None and task.target_radec is None:
        raise WaitForLog("no_coordinates",
                         f"log line {entry.line_no} gives no coordinates for "
                         f"{entry.name!r} and the name could not be resolved")
    if (task.stars is None or len(task.stars) == 0) and not task.relative:
        raise WaitForCatalog("catalog_unavailable",
                             "no reference stars for this field (no local catalog, "
                             "nothing cached)")
    return task.target_radec or (entry.ra_deg, entry.dec_deg)


def detect(calibrated: np.ndarray, mask: np.ndarray,
           task: FrameTask) -> tuple[Table, float, float]:
    """Sources of the calibrated frame, the background RMS and the median FWHM (px)."""
    return astrometry.detect_sources(calibrated, mask,
                                     detect_sigma=task.cfg.astrometry.detect_sigma,
                                     saturation=task.cfg.camera(task.band).saturation_adu)


def guess_wcs(header: fits.Header) -> WCS:
    """The WCS the rebuilt header predicts from the log's pointing and the config scale."""
    return WCS(header, naxis=2)


def solve_frame(sources: Table, header: fits.Header, shape: tuple[int, int],
                target: tuple[float, float], fwhm_px: float, task: FrameTask,
                ) -> tuple[astrometry.Solution, Table, RelativeReference | None]:
    """The frame's WCS, the stars to measure and (no catalog) the series' reference.

    With a catalog: solved against the catalog cone (:func:`astrometry.solve`,
    whose quality gate raises :class:`~photd.astrometry.BadFit`). Without one:
    the series' first frame becomes its reference, the others are registered to it.
    """
    cfg = task.cfg.astrometry
    if not task.relative:
        sol = astrometry.solve(sources, task.stars, guess=guess_wcs(header), shape=shape,
                               cfg=cfg)
        return sol, task.stars, None
    reference = task.reference
    if reference is None:  # the series' first frame: the others follow it
        guess = guess_wcs(header)
        reference = relative_reference(sources, guess, band=task.band, frame_id=task.frame_id,
                                       frame_number=task.frame_number, target_radec=target,
                                       fwhm_px=fwhm_px, cfg=cfg)
        sol = astrometry.Solution(
            wcs=guess, n_matches=reference.n_sources, rms_arcsec=float("nan"),
            scale_arcsec=astrometry.wcs_scale_arcsec(guess),
            rotation_deg=astrometry.wcs_rotation_deg(guess), offset_arcsec=0.0,
            matches=Table(), relative=True)
    else:
        sol = register_relative(sources, reference, shape=shape, fwhm_px=fwhm_px, cfg=cfg)
    return sol, reference_stars(reference), reference


def record_solution(header: fits.Header, sol: astrometry.Solution,
                    reference: RelativeReference | None, sources: Table, fwhm_px: float,
                    task: FrameTask, history: list[str]) -> dict[str, Any]:
    """Put the fitted WCS into the header; the solution as the store keeps it."""
    set_wcs(header, sol.wcs)
    header["NMATCH"] = (sol.n_matches, "reference frame sources matched" if task.relative
                        else "catalog stars matched")
    if np.isfinite(sol.rms_arcsec):
        header["WCSRMS"] = (round(sol.rms_arcsec, 4), "[arcsec] WCS fit residual")
    header["FWHM"] = (round(fwhm_px, 3), "[px] median FWHM of stars")
    wcs_cards = {k: header[k] for k in sol.wcs.to_header(relax=True)}
    if reference is not None:
        # No catalog: positions are relative to the reference frame's header guess,
        # whose absolute error is the telescope's pointing error.
        header["WCSREL"] = (True, "WCS relative: no catalog, pointing-error offset")
        header["WCSREF"] = (reference.frame_number, "frame the WCS is registered to")
        history.append(f"relative WCS: registered to frame {reference.frame_number} "
                       f"({sol.n_matches} sources), no catalog for this field")
        wcs_cards.update(WCSREL=True, RELREFID=reference.id)
    else:
        history.append(f"WCS: {sol.n_matches} matches, rms {sol.rms_arcsec:.3f} arcsec")
    is_reference = reference is not None and reference.frame_id == task.frame_id
    if is_reference:
        wcs_cards["relative_reference"] = reference.to_json()  # kept with the frame
    return {"n_sources": len(sources), "n_matches": sol.n_matches,
            "rms_arcsec": sol.rms_arcsec if np.isfinite(sol.rms_arcsec) else None,
            "scale_arcsec": sol.scale_arcsec, "rotation_deg": sol.rotation_deg,
            "fwhm_px": fwhm_px,
            "relative": RELATIVE_REFERENCE if is_reference
            else RELATIVE_REGISTERED if reference is not None else 0,
            "header": wcs_cards}


def write_frame(header: fits.Header, history: list[str], task: FrameTask) -> str:
    """The processed copy: raw pixels, rebuilt header, fitted WCS, history lines."""
    for line in history:
        header.add_history(f"photd {__version__}: {line}")
    return str(write_processed(task.raw_path, task.out_path, header,
                               compress=task.cfg.output.compress))


def measure(calibrated: np.ndarray, mask: np.ndarray, header: fits.Header, exptime_s: float,
            sol: astrometry.Solution, stars: Table, target: tuple[float, float],
            reference: RelativeReference | None, fwhm_px: float, task: FrameTask,
            target_status: str | None = None,
            ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], Any]:
    """Photometry of every star and the target: (zero point, store rows, frame summary).

    ``target_status`` (:mod:`photd.targets`) flags the target's rows when its
    position was not confirmed by a detection.
    """
    gain = task.gain_e_per_adu or 1.0
    rdnoise = task.rdnoise_e or 0.0
    # A catalog row named like the target IS the target: measured once, as the
    # target, and never a field or comparison star.
    stars = stars[~targets.catalog_rows_named(stars, task.entry.name)]
    # relative: where the reference frame's source taken for the target is
    measure_at = tuple(reference.target_radec) if reference is not None else target
    table, summary = photometry.measure_frame(
        calibrated * np.float32(gain), wcs=sol.wcs, stars=stars, target_radec=measure_at,
        target_name=task.entry.name, fwhm_px=fwhm_px, exptime_s=exptime_s,
        gain_e_per_adu=gain, rdnoise_e=rdnoise, mask=mask, cfg=task.cfg.photometry)
    zp = lightcurve.zero_point(table, stars, task.band, exclude=(task.entry.name,))
    table = lightcurve.calibrate(table, zp, stars, task.band)
    mjd_mid, bjd_tdb = lightcurve.times(header["DATE-OBS"], exptime_s, target[0], target[1],
                                        task.cfg.site)
    zeropoint = None if task.relative else {
        "zp": zp.zp, "zp_err": zp.zp_err, "n_stars": zp.n_stars, "scatter": zp.scatter,
        "colour_term": zp.colour_term}
    rows = [{**{k: _plain(row[k]) for k in table.colnames}, "target": task.entry.name,
             "band": task.band, "mjd_mid": mjd_mid, "bjd_tdb": bjd_tdb, "fwhm_px": fwhm_px,
             "airmass": header.get("AIRMASS")} for row in table]
    doubt = _TARGET_FLAGS.get(target_status or "", 0)
    for row in rows:
        if row["star_id"] == task.entry.name:
            row["flags"] = int(row["flags"]) | doubt
    return zeropoint, rows, summary


#: Light-curve flags of a target whose position the detections did not confirm.
_TARGET_FLAGS = {targets.AMBIGUOUS: TARGET_AMBIGUOUS, targets.NOT_FOUND: TARGET_NOT_FOUND}


def locate_target(sources: Table, sol: astrometry.Solution, pointing: tuple[float, float],
                  fwhm_px: float, task: FrameTask,
                  ) -> tuple[tuple[float, float], dict[str, Any] | None]:
    """Where the target is measured on this frame, and (not decided yet) the evidence.

    The night's decision is used as it is. Without one the prior position
    (configuration, catalog row, SIMBAD or the log) is refined on this frame's
    detections (:func:`photd.targets.refine`); the main process keeps the first
    such refinement as the night's decision. A relative series (no catalog)
    measures where its reference frame put the target.
    """
    prior = task.target
    if prior is None or task.relative:
        return pointing, None
    ra, dec = sol.wcs.all_pix2world(np.asarray(sources["x"], float),
                                    np.asarray(sources["y"], float), 0)
    fwhm_arcsec = fwhm_px * sol.scale_arcsec
    if task.target_status is not None:
        # Decided: start from this frame's own detection of the chosen source, so
        # a frame's result never depends on which frame happened to decide.
        if task.target_status != targets.REFINED:
            return (prior.ra_deg, prior.dec_deg), None
        got = targets.refine(prior, ra, dec, search_arcsec=fwhm_arcsec, fwhm_arcsec=0.0)
        return (got.ra_deg, got.dec_deg), None
    got = targets.refine(prior, ra, dec, search_arcsec=task.cfg.photometry.target_search_arcsec,
                         fwhm_arcsec=fwhm_arcsec)
    evidence = {"ra_deg": got.ra_deg, "dec_deg": got.dec_deg, "source": prior.source,
                "catalog_id": prior.catalog_id, "prior_ra_deg": prior.ra_deg,
                "prior_dec_deg": prior.dec_deg, "status": got.status,
                "offset_arcsec": _finite_or_none(got.offset_arcsec),
                "runner_up_arcsec": _finite_or_none(got.runner_up_arcsec)}
    return (got.ra_deg, got.dec_deg), evidence


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def dark_is_negligible(paths: list[str], bias: np.ndarray | None, exptimes: list[float],
                       cam: Any) -> bool:
    """The paper: dark current below 0.1 e-/px/s is negligible, and gets no master.

    Judged from the frames' levels, before combining; with no usable dark (NaN)
    build_master says why. The night's gain is not known yet: a nominal one.
    """
    if bias is None:
        return False
    level = calibration.dark_level_adu_per_s(paths, bias, exptimes, cam)
    return math.isfinite(level) and not calibration.dark_is_significant(
        level, gain_e_per_adu=NOMINAL_GAIN_E_PER_ADU, cam=cam)


def gain_readnoise(bias_frames: list[str], flat_frames: list[str]) -> dict:
    """Photon transfer from pairs of the night's biases and flats (paper 4.2)."""
    n = min(len(bias_frames), len(flat_frames), 6) // 2 * 2
    biases = [calibration.read_frame(p)[0] for p in bias_frames[:n]]
    flats = [calibration.read_frame(p)[0] for p in flat_frames[:n]]
    g = calibration.gain_readnoise_pairs(biases, flats)
    return {"gain": float(g.gain_e_per_adu), "rdnoise": float(g.read_noise_e),
            "gain_inputs": bias_frames[:n] + flat_frames[:n]}


# --------------------------------------------------------------------------- relative WCS

#: Reference detections kept for registering later frames (brightest first).
_REFERENCE_SOURCES = 300
#: Stars of a relative series' star list (bright, unsaturated, isolated).
_REFERENCE_STARS = 80


def relative_reference(sources: Table, guess: WCS, *, band: str, frame_id: int,
                       frame_number: int, target_radec: tuple[float, float],
                       fwhm_px: float, cfg: Any) -> RelativeReference:
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
    """
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
    ref = RelativeReference(
        id="", frame_id=int(frame_id), frame_number=int(frame_number),
        wcs={k: _plain(v) for k, v in guess.to_header(relax=True).items()},
        sources={c: [_plain(v) for v in usable[c]] for c in ("x", "y", "flux")},
        stars={"id": [str(v) for v in stars["id"]], "ra": [float(v) for v in stars["ra"]],
               "dec": [float(v) for v in stars["dec"]]},
        target_radec=measure_at, target_sep_arcsec=sep, runner_up_arcsec=runner_up)
    content = {k: v for k, v in ref.to_json().items() if k != "id"}
    return replace(ref, id=hashlib.sha1(json.dumps(content, sort_keys=True)
                                        .encode()).hexdigest()[:12])


def register_relative(sources: Table, reference: RelativeReference, *,
                      shape: tuple[int, int], fwhm_px: float, cfg: Any) -> Any:
    """A frame's WCS in its series' relative system (registered to the reference frame)."""
    ref_wcs = WCS(fits.Header(reference.wcs), naxis=2)
    ref_sources = Table(reference.sources)
    ref_sources["sharp"] = np.zeros(len(ref_sources), bool)
    ref_sources["saturated"] = np.zeros(len(ref_sources), bool)
    return astrometry.relative_solution(sources, ref_sources, ref_wcs, shape=shape, cfg=cfg,
                                        fwhm_px=fwhm_px)


def reference_stars(reference: RelativeReference) -> Table:
    """The star list of a relative series: ``id``, ``ra``, ``dec`` and no magnitudes."""
    stars = Table(reference.stars)
    for band in ("g", "r", "i"):
        stars[band] = np.full(len(stars), np.nan)
    return stars
