"""Light curves from the store: the glue between stored rows and :mod:`photd.lightcurve`.

The store keeps every star's instrumental measurement of every frame, so a
target's differential curve (and its comparison stars' curves, for plots) can
be derived again at any time, by the daemon after each frame or by ``photd
plot`` afterwards, with the same code.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from photd.config import Config
from photd.lightcurve import EnsembleInfo, derive_lightcurve
from photd.store import Store

#: Light-curve row flag (beyond the photometry bits): the frame was calibrated
#: with provisional masters (an earlier night's, or none yet); it is measured
#: again when the night's own masters are built.
PROVISIONAL_CALIBRATION = 1024
#: Light-curve row flag: no catalog covers the field, so the frame's WCS is
#: relative (registered to the series' first frame, absolute position off by
#: the pointing error), the target is the source nearest the log's coordinates
#: on that frame, and there is no zero point (``mag`` is NaN; ``diff_mag`` is
#: instrumental). Measured again against the catalog once one covers the field.
RELATIVE_WCS = 512


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


def measurement_table(store: Store, target: str, band: str) -> Table | None:
    """Every stored per-star row of a target's done frames in one band, or None."""
    frames = {f["id"]: f for f in store.frames(states=["done", "processing", "queued"],
                                               band=band) if f["target"] == target}
    rows = [r for r in store.measurements_for(target=target, band=band)
            if r["frame_id"] in frames]
    if not rows:
        return None
    scale = {}
    for fid in frames:
        sol = store.solution(fid)
        scale[fid] = sol["scale_arcsec"] if sol else math.nan
    # Column by column: astropy builds a table from a list of row dicts ~10x slower.
    def col(key: str) -> np.ndarray:
        return np.array([_nan(r[key]) for r in rows], float)

    return Table({
        "frame": np.array([r["frame_id"] for r in rows], np.int64),
        "star_id": [r["star_id"] for r in rows],
        "x_px": col("x_px"), "y_px": col("y_px"), "mag_inst": col("mag_inst"),
        "mag_inst_err": col("mag_inst_err"),
        "flags": np.array([r["flags"] or 0 for r in rows], np.int64),
        "aperture_px": col("aperture_px"), "mjd": col("mjd_mid"), "bjd_tdb": col("bjd_tdb"),
        "airmass": col("airmass"),
        "fwhm_arcsec": col("fwhm_px") * np.array([scale.get(r["frame_id"], math.nan)
                                                  for r in rows], float),
    })


def relative_frames(store: Store, frame_ids: Any) -> tuple[dict[int, str], str | None]:
    """Frames measured in a relative WCS -> their reference's id, and the newest reference.

    The newest reference is the one a stored reference frame carries (see
    :func:`photd.pipeline.relative_reference`); None when none is stored.
    """
    out: dict[int, str] = {}
    current = None
    for fid in sorted({int(f) for f in frame_ids}):
        sol = store.solution(fid)
        if not sol or not sol["relative"]:
            continue
        header = sol["header"] or {}
        out[fid] = str(header.get("RELREFID"))
        if "relative_reference" in header:
            current = out[fid]
    return out, current


def derive(store: Store, catalog: Table | None, target: str, band: str,
           cfg: Config) -> tuple[list[dict], EnsembleInfo] | None:
    """The target's differential curve as store rows, and the ensemble behind it.

    One curve never mixes star lists: while frames of a field measured against
    the catalog exist, frames measured in a relative WCS (waiting to be measured
    again) are left out; a field without catalog uses the frames registered to
    its current reference frame.
    """
    table = measurement_table(store, target, band)
    if table is None:
        return None
    relative, current = relative_frames(store, table["frame"])
    absolute = set(int(f) for f in table["frame"]) - set(relative)
    is_relative = not (absolute and catalog is not None and len(catalog))
    if is_relative:
        if current is None and relative:  # the reference frame's row is gone: the commonest
            ids = list(relative.values())
            current = max(set(ids), key=ids.count)
        keep = [f for f, ref in relative.items() if ref == current]
    else:
        keep = sorted(absolute)
    if not keep:
        return None
    table = table[np.isin(np.asarray(table["frame"], int), keep)]
    lc_rows, info = derive_lightcurve(table, catalog, target=target, band=band,
                                      cfg=cfg.photometry, relative=is_relative)
    provisional = {f["id"] for f in store.frames(band=band)
                   if (f["calib_version"] or "").startswith("provisional")}
    out = [{
        "frame_id": int(r["frame"]), "target": target, "band": band,
        "mjd": r["mjd"], "bjd_tdb": r["bjd_tdb"], "mag": r["mag"], "mag_err": r["mag_err"],
        "diff_mag": r["diff_mag"], "diff_mag_err": r["diff_mag_err"], "airmass": r["airmass"],
        "fwhm_arcsec": r["fwhm_arcsec"], "aperture_px": r["aperture_px"],
        "flags": int(r["flags"] or 0)
        | (PROVISIONAL_CALIBRATION if int(r["frame"]) in provisional else 0)
        | (RELATIVE_WCS if is_relative else 0),
        "ensemble_version": r["ensemble_version"],
        # comparison_ids is "a;b;c": list() of it would store single characters
        "comparison": [c for c in str(r["comparison_ids"]).split(";") if c]} for r in lc_rows]
    return out, info


def target_position(store: Store, target: str) -> tuple[float, float] | None:
    """The pointing the log gave for a target, read back from a processed frame."""
    for f in store.frames(states=["done"]):
        if f["target"] == target and f["output"]:
            try:
                hdr = fits.getheader(f["output"])
                return float(hdr["CRVAL1"]), float(hdr["CRVAL2"])
            except (OSError, KeyError, ValueError):
                continue
    return None


class PendingCurves:
    """Light curves to derive again, and the "frame done" events that wait for them.

    A series with nothing more queued or running is derived at once (the
    live case: one frame at a time). A backlog of the same series (a
    restart, a copied night) is derived at most every ``interval_s``, since
    each derivation reads the whole night back: one per frame made a night's
    backlog quadratic.
    """

    def __init__(self, store: Store, cfg: Config, log: Any) -> None:
        self.store = store
        self.cfg = cfg
        self.log = log
        # (target, band) -> the "frame done" events waiting for the curve
        self.pending: dict[tuple[str, str], list[dict]] = {}
        # when each was last derived (time.monotonic())
        self.derived_at: dict[tuple[str, str], float] = {}

    def __bool__(self) -> bool:
        return bool(self.pending)

    def add(self, target: str, band: str, event: dict | None = None) -> None:
        """The curve must be derived again; ``event`` is logged once it is."""
        events = self.pending.setdefault((target, band), [])
        if event is not None:
            events.append(event)

    def flush(self, *, waiting: set[tuple[str, str]], ready: Callable[[str], bool],
              catalog_of: Callable[[str], Table | None], force: bool = False) -> None:
        """Derive the pending curves that are due.

        ``waiting``: (target, band) with frames still queued or running;
        ``ready(target)``: whether its catalog cone is at hand; ``catalog_of(target)``:
        that cone (None: derive a relative curve); ``force``: stopping, derive all.
        """
        for key in list(self.pending):
            last = self.derived_at.get(key)
            if (not force and key in waiting and last is not None
                    and time.monotonic() - last < self.cfg.daemon.lightcurve_interval_s):
                continue
            if not ready(key[0]):
                if force:  # stopping: the stale mark in the store carries it to the next start
                    self.pending.pop(key)
                continue
            events = self.pending.pop(key)
            try:
                with self.store.transaction():
                    self._derive(*key, catalog_of(key[0]))
            except Exception as exc:  # keep the daemon (and the mark) alive; say which curve
                self.log.error("light curve not derived", stage="lightcurve", target=key[0],
                               band=key[1], reason=type(exc).__name__, error=str(exc),
                               frames=[ev["frame"] for ev in events])
                continue
            self.derived_at[key] = time.monotonic()
            for ev in events:
                closed_at = ev.pop("closed_at")
                self.log.info("frame done", stage="store", **ev,
                              latency_s=round(time.time() - closed_at, 3))

    def _derive(self, target: str, band: str, catalog: Table | None) -> None:
        """Re-derive the target's whole differential curve from the stored measurements.

        Revising the comparison ensemble as the night goes on re-derives every
        earlier point with it, so the curve never mixes ensembles. No catalog:
        a field measured in a relative WCS still has a differential curve.
        """
        got = derive(self.store, catalog, target, band, self.cfg)
        if got is None:
            return
        rows, info = got
        for sid, why in info.rejected.items():
            self.log.info("comparison star dropped", stage="lightcurve", target=target,
                          band=band, star=sid, reason=why)
        self.store.replace_lightcurve(target, band, rows, info.ensemble_version)
