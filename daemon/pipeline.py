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

from daemon import __version__
from daemon.config import Config
from daemon.obslog import LogEntry

SCIENCE_STEPS = ("read", "headers", "calibrate", "detect", "solve", "write", "photometry")
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

        from daemon import astrometry, calibration, lightcurve, photometry  # noqa: F401
        from daemon.config import SiteConfig
        from daemon.headers import airmass

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
    from daemon.headers import build_header

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
    from daemon.calibration import read_master

    return read_master(path)[0]


def load_master(path: str | None) -> np.ndarray | None:
    """A master calibration's pixels, cached per worker process."""
    if not path:
        return None
    return _master(path, Path(path).stat().st_mtime)


def guess_wcs(header: fits.Header) -> WCS:
    """The WCS the rebuilt header predicts from the log's pointing and the config scale."""
    return WCS(header, naxis=2)


# --------------------------------------------------------------------------- flows


def _os_error(result: FrameResult, exc: OSError, limit: int) -> None:
    """A full work disk is the daemon's problem, not the frame's: retry it later."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        # The atomic write left nothing behind; 'arrived' is taken up again by
        # the next rescan, and intake pauses while the disk stays full.
        result.state, result.reason, result.output = "arrived", "disk_full", None
        result.message = f"work disk full while writing: {exc}"
    else:
        result.state, result.reason = "failed", type(exc).__name__
        result.message = f"{exc}\n{traceback.format_exc(limit=limit)}"


def process_calibration(task: FrameTask) -> FrameResult:
    """Rebuild a calibration frame's header and store the header-fixed copy."""
    from daemon.headers import write_processed

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
    except FrameRejected as exc:
        result.state, result.reason, result.message = exc.state, exc.reason, str(exc)
    except OSError as exc:
        _os_error(result, exc, limit=4)
    except Exception as exc:  # a bug or an unexpected file must stop this frame only
        result.state, result.reason = "failed", type(exc).__name__
        result.message = f"{exc}\n{traceback.format_exc(limit=4)}"
    return result


def process_science(task: FrameTask) -> FrameResult:
    """Headers, calibration, astrometry and photometry of one science frame."""
    from daemon import astrometry, calibration, photometry
    from daemon.headers import write_processed

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
        if task.stars is None or len(task.stars) == 0:
            raise FrameRejected("waiting_catalog", "catalog_unavailable",
                                "no reference stars for this field (no local catalog, "
                                "nothing cached)")
        with _step(t, "detect"):
            binning = int(header.get("XBINNING", 1) or 1)
            sources, bg_rms, fwhm_px = astrometry.detect_sources(
                calibrated, mask, detect_sigma=cfg.astrometry.detect_sigma,
                saturation=cam.saturation_adu)
        with _step(t, "solve"):
            stars = task.stars
            try:
                sol = astrometry.solve(sources, stars, guess=guess_wcs(header),
                                       shape=calibrated.shape, cfg=cfg.astrometry)
            except astrometry.BadFit as exc:
                raise FrameRejected("badfit", exc.reason, str(exc)) from exc
        header.update(sol.wcs.to_header(relax=True))
        header["NMATCH"] = (sol.n_matches, "catalog stars matched")
        header["WCSRMS"] = (round(sol.rms_arcsec, 4), "[arcsec] WCS fit residual")
        header["FWHM"] = (round(float(fwhm_px), 3), "[px] median FWHM of stars")
        history.append(f"WCS: {sol.n_matches} matches, rms {sol.rms_arcsec:.3f} arcsec")
        result.solution = {"n_sources": len(sources), "n_matches": sol.n_matches,
                           "rms_arcsec": sol.rms_arcsec, "scale_arcsec": sol.scale_arcsec,
                           "rotation_deg": sol.rotation_deg, "fwhm_px": float(fwhm_px),
                           "relative": 0,
                           "header": {k: header[k] for k in sol.wcs.to_header(relax=True)}}
        with _step(t, "write"):
            for line in history:
                header.add_history(f"photd {__version__}: {line}")
            out = write_processed(task.raw_path, task.out_path, header,
                                  compress=cfg.output.compress)
            result.output = str(out)
        with _step(t, "photometry"):
            from dataclasses import asdict

            from daemon import lightcurve

            gain = task.gain_e_per_adu or 1.0
            rdnoise = task.rdnoise_e or 0.0
            target = task.target_radec or (ra0, dec0)
            table, summary = photometry.measure_frame(
                calibrated * np.float32(gain), wcs=sol.wcs, stars=stars,
                target_radec=target, target_name=task.entry.name, fwhm_px=float(fwhm_px),
                exptime_s=exptime_s, gain_e_per_adu=gain, rdnoise_e=rdnoise, mask=mask,
                cfg=cfg.photometry)
            zp = lightcurve.zero_point(table, stars, task.band, exclude=(task.entry.name,))
            table = lightcurve.calibrate(table, zp, stars, task.band)
            mjd_mid, bjd_tdb = lightcurve.times(header["DATE-OBS"], exptime_s, target[0],
                                                target[1], cfg.site)
            airmass = header.get("AIRMASS")
            result.zeropoint = {"zp": zp.zp, "zp_err": zp.zp_err, "n_stars": zp.n_stars,
                                "scatter": zp.scatter, "colour_term": zp.colour_term}
            result.measurements = [
                {**{k: _plain(row[k]) for k in table.colnames}, "target": task.entry.name,
                 "band": task.band, "mjd_mid": mjd_mid, "bjd_tdb": bjd_tdb,
                 "fwhm_px": float(fwhm_px), "airmass": airmass}
                for row in table]
            result.summary = asdict(summary)
            result.summary.update(binning=binning, bg_rms=float(bg_rms),
                                  scale_arcsec=sol.scale_arcsec)
    except FrameRejected as exc:
        result.state, result.reason, result.message = exc.state, exc.reason, str(exc)
    except OSError as exc:
        _os_error(result, exc, limit=6)
    except Exception as exc:  # a bug or an unexpected file must stop this frame only
        result.state, result.reason = "failed", type(exc).__name__
        result.message = f"{exc}\n{traceback.format_exc(limit=6)}"
    return result
