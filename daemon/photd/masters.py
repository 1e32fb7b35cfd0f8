"""Master calibrations: which a frame gets, which rebuilds are due, and what they change.

A calibration frame makes its night's master of that kind (and band)
*dirty*; a rebuild combines every calibration frame of the kind into a new
version. Flats and darks are built against the night's master bias, so they
wait for it; a new bias makes the flats dirty again. Science frames measured
with older or provisional masters are measured again once newer ones exist.
"""

from __future__ import annotations

import json
from typing import Any

from photd.config import Config
from photd.frame_queue import FrameQueue, MasterJob
from photd.pipeline import Masters, MasterTask
from photd.store import Store
from photd.workdir import master_path

KINDS = ("bias", "flat", "dark")


def choose_masters(store: Store, cfg: Config, night: str, band: str) -> Masters:
    """The night's newest masters, else an earlier night's (flagged provisional)."""
    age = cfg.calibration.max_master_age_days
    chosen: dict[str, dict | None] = {}
    provisional = False
    for kind in KINDS:
        row = store.latest_calibration(night, band, kind)
        if row is None:
            row = store.calibration_before(night, band, kind, age)
            if row is not None or kind != "dark":
                provisional = True
        chosen[kind] = row
    parts = [f"{k} {r['night']} v{r['version']}" for k, r in chosen.items() if r]
    det = store.detector_params(night, band)
    if det:  # a new gain changes every flux in electrons: it is part of the version
        parts.append(f"gain {det['gain_e_per_adu']:.4f}")
    return Masters(
        bias=chosen["bias"]["path"] if chosen["bias"] else None,
        flat=chosen["flat"]["path"] if chosen["flat"] else None,
        dark=chosen["dark"]["path"] if chosen["dark"] else None,
        version=("provisional: " if provisional else "")
        + (", ".join(parts) if parts else "uncalibrated"),
        provisional=provisional)


class MasterRebuilds:
    """The (night, band, kind) masters whose calibration frames changed."""

    def __init__(self) -> None:
        self.dirty: set[tuple[str, str, str]] = set()

    def __bool__(self) -> bool:
        return bool(self.dirty)

    def mark(self, night: str, band: str, kind: str) -> None:
        self.dirty.add((night, band, kind))

    def busy_bands(self) -> set[tuple[str, str]]:
        """(night, band) with a rebuild due."""
        return {(k[0], k[1]) for k in self.dirty}

    def due(self, store: Store, cfg: Config,
            busy: set[tuple[str, str, str]]) -> list[tuple[MasterJob, MasterTask]]:
        """The rebuilds to start now (each leaves the dirty set).

        ``busy``: (night, band, kind) being rebuilt or with calibration frames
        queued or in hand. A backlog of calibration frames (after a restart, or a
        copied night) gives one rebuild for the whole batch instead of one per
        frame: it waits for the batch.
        """
        out = []
        for key in sorted(self.dirty):
            night, band, kind = key
            if key in busy or (kind != "bias" and (night, band, "bias") in self.dirty):
                continue
            if kind != "bias" and (night, band, "bias") in busy:
                continue
            bias = store.latest_calibration(night, band, "bias")
            if kind != "bias" and bias is None:
                continue  # flats and darks need this night's bias first
            out.append(self._rebuild(store, cfg, key, bias))
            self.dirty.discard(key)
        return out

    @staticmethod
    def _rebuild(store: Store, cfg: Config, key: tuple[str, str, str],
                 bias: dict | None) -> tuple[MasterJob, MasterTask]:
        night, band, kind = key
        frames = [f for f in store.frames(night=night, band=band)
                  if f["kind"] == kind and f["state"] in ("calibration", "rejected")
                  and f["output"]]
        frames.sort(key=lambda f: f["frame_number"])
        prev = store.latest_calibration(night, band, kind)
        version = (prev["version"] + 1) if prev else 1
        bias_frames = [f["output"] for f in store.frames(
            states=["calibration"], night=night, band=band) if f["kind"] == "bias"]
        task = MasterTask(kind=kind, band=band, night=night, version=version,
                          inputs=tuple(f["output"] for f in frames),
                          out_path=str(master_path(cfg.work_dir, night, band, kind, version)),
                          cfg=cfg, bias_path=bias["path"] if bias and kind != "bias" else None,
                          bias_frames=tuple(sorted(bias_frames)))
        job = MasterJob(night, band, kind, version, {f["output"]: f["id"] for f in frames})
        return job, task

    def resume(self, store: Store) -> None:
        """Start-up: masters missing some of the stored calibration frames are dirty."""
        for night, band, kind in {(f["night"], f["band"], f["kind"])
                                  for f in store.frames(states=["calibration"])}:
            latest = store.latest_calibration(night, band, kind)
            inputs = set(json.loads(latest["inputs"]) if latest and isinstance(
                latest["inputs"], str) else (latest["inputs"] if latest else []))
            outs = {f["output"] for f in store.frames(states=["calibration"], night=night,
                                                      band=band) if f["kind"] == kind}
            if outs - inputs:
                self.mark(night, band, kind)

    def built(self, store: Store, job: MasterJob, result: dict) -> None:
        """Record a new master version, its rejected inputs and (flats) the gain."""
        night, band, kind = job.key
        ids = job.id_by_output
        with store.transaction():
            store.record_calibration(night, band, kind, path=result["path"],
                                     inputs=result["inputs"])
            for out, (reason, message) in result["rejected"].items():
                store.set_state(ids[out], "rejected", f"{reason}: {message}")
            for out in result["inputs"]:
                f = store.frame(ids[out])
                if f and f["state"] == "rejected":
                    store.set_state(ids[out], "calibration", None)
            if result.get("gain"):
                store.set_detector_params(night, band, gain_e_per_adu=result["gain"],
                                          rdnoise_e=result["rdnoise"],
                                          inputs=result["gain_inputs"])
        if kind == "bias" and store.latest_calibration(night, band, "flat"):
            # flats (and gain) were built against an older master bias: rebuild them
            self.mark(night, band, "flat")


def requeue_stale(store: Store, cfg: Config, queue: FrameQueue, night: str, band: str,
                  log: Any) -> None:
    """Frames measured with older or provisional masters are measured again."""
    current = choose_masters(store, cfg, night, band).version
    for f in store.frames(states=["done", "badfit"], night=night, band=band):
        if f["calib_version"] != current and f["id"] not in queue:
            log.info("re-measuring with final masters", frame=f["path"], band=band,
                     stage="calibrate", old=f["calib_version"], new=current)
            queue.requeue(f["id"])


__all__ = ["MasterRebuilds", "choose_masters", "requeue_stale"]
