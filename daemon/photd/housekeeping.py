"""Housekeeping: the work disk's free space, the store's backup and integrity, night summaries."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from photd.atomic import atomic_write_text
from photd.export import plot_lightcurve
from photd.obslog import slug
from photd.store import Store, StoreDamaged, StoreError
from photd.workdir import backup_path, night_folder, pause_marker

#: The free-space threshold is at most this fraction of the work disk's size: a
#: threshold near the disk's size would pause intake for good on a small disk.
MAX_FREE_FRACTION = 0.1


def sane_disk_threshold(work: Path, min_free_mb: float, log: Any) -> float:
    """``daemon.min_free_disk_mb`` checked against the work disk's size at start.

    A threshold above :data:`MAX_FREE_FRACTION` of the disk is lowered to it,
    with a warning naming the key (the default 1024 MB on a 1 GB card would
    otherwise never let intake run).
    """
    total_mb = shutil.disk_usage(work).total / 1e6
    cap = round(MAX_FREE_FRACTION * total_mb, 1)
    if min_free_mb > cap:
        log.warning("daemon.min_free_disk_mb is more than the work disk can ever have free: "
                    "lowered", stage="disk", reason="disk_threshold_lowered",
                    min_free_disk_mb=min_free_mb, disk_mb=round(total_mb, 1), used_mb=cap)
        return cap
    return min_free_mb


def check_disk(work: Path, min_free_mb: float, paused: bool, log: Any,
               on_resume: Callable[[], None]) -> bool:
    """Whether intake must pause: the work disk has less than ``min_free_mb`` free.

    Pausing writes :func:`~photd.workdir.pause_marker` for ``photd status``;
    when there is room again ``on_resume()`` runs (the caller rescans) and the
    marker goes.
    """
    work.mkdir(parents=True, exist_ok=True)
    free_mb = shutil.disk_usage(work).free / 1e6
    low = free_mb < min_free_mb
    marker = pause_marker(work)
    if low and not paused:
        log.error("WORK DISK NEARLY FULL: intake paused", stage="disk",
                  reason="disk_full", free_mb=round(free_mb, 1))
        try:  # for `photd status`; a few bytes, but the disk is nearly full
            atomic_write_text(marker, json.dumps({
                "since": time.time(), "free_mb": round(free_mb, 1),
                "min_free_disk_mb": min_free_mb}))
        except OSError as exc:
            log.error("cannot record the pause", stage="disk", reason="disk_full",
                      error=str(exc))
    elif not low:
        if paused:
            log.warning("work disk has room again: intake resumed", stage="disk",
                        free_mb=round(free_mb, 1))
            on_resume()
        marker.unlink(missing_ok=True)  # also one left by an earlier run
    return low


def housekeeping(store: Store, work: Path, log: Any) -> None:
    """Night summaries and plots, a backup of the store and an integrity check."""
    t0 = time.perf_counter()
    for night in {f["night"] for f in store.frames() if f["night"]}:
        try:
            night_summary(store, work, night)
        except Exception as exc:  # a plot must never stop the daemon
            log.warning("night summary failed", stage="housekeeping", night=night,
                        reason=type(exc).__name__, error=str(exc))
    dest = backup_path(work)
    try:
        # backup() checks the copy (quick_check) before it replaces the newest
        # backup and rotates the older ones: a damaged store destroys no good copy.
        store.backup(dest)
        check = "ok"
    except StoreDamaged:
        raise  # the store itself is damaged: the daemon stops; the next start restores
    except (StoreError, OSError) as exc:
        check = "not checked"
        log.error("backup not written", stage="housekeeping", reason="backup_failed",
                  backup=str(dest), error=str(exc))
    store.checkpoint()
    log.info("housekeeping", stage="housekeeping", integrity=check, backup=str(dest),
             elapsed_s=round(time.perf_counter() - t0, 3))


def night_summary(store: Store, work: Path, night: str) -> Path:
    """``<work>/nights/<night>/summary.json`` and one light-curve PNG per target."""
    folder = night_folder(work, night)
    folder.mkdir(parents=True, exist_ok=True)
    frames = store.frames(night=night)
    counts: dict[str, int] = {}
    for f in frames:
        counts[f["state"]] = counts.get(f["state"], 0) + 1
    targets: dict[str, dict] = {}
    for f in frames:
        if f["kind"] == "object" and f["target"]:
            targets.setdefault(f["target"], {})
    for target, info in targets.items():
        rows = [r for r in store.lightcurve(target)
                if any(f["id"] == r["frame_id"] for f in frames)]
        by_band: dict[str, list[dict]] = {}
        for r in rows:
            by_band.setdefault(r["band"], []).append(r)
        for band, rs in by_band.items():
            diffs = sorted(r["diff_mag"] for r in rs if r["diff_mag"] is not None)
            info[band] = {"points": len(rs),
                          "diff_mag_range": [diffs[0], diffs[-1]] if diffs else None,
                          "median_err": sorted(r["diff_mag_err"] or 0 for r in rs)[
                              len(rs) // 2]}
        if by_band:
            png = folder / f"{slug(target)}.png"
            plot_lightcurve(by_band, {}, png, title=f"{target} {night}")
            info["plot"] = str(png)
    masters = {b: {k: (store.latest_calibration(night, b, k) or {}).get("version")
                   for k in ("bias", "flat", "dark")} for b in ("g", "r", "i")}
    detector = {b: store.detector_params(night, b) for b in ("g", "r", "i")}
    summary = {"night": night, "counts": counts, "targets": targets, "masters": masters,
               "detector": {b: ({"gain_e_per_adu": d["gain_e_per_adu"],
                                 "rdnoise_e": d["rdnoise_e"]} if d else None)
                            for b, d in detector.items()}}
    return atomic_write_text(folder / "summary.json",
                             json.dumps(summary, indent=1, default=str))
