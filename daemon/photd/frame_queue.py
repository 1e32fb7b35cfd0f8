"""The frames waiting for a worker, and the jobs the workers have in hand.

:class:`FrameQueue` keeps the order (calibration frames ahead of science
frames: every science frame of a band waits for the masters they build) and,
for each queued frame, what scheduling decisions need (night, band, target,
kind) without reading the frame back from the store. :class:`InFlight` maps
each running future to a typed job: :class:`ScienceJob`,
:class:`CalibrationJob` or :class:`MasterJob`.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from photd.calibration import CALIBRATION_KINDS
from photd.store import Store


class Queued(NamedTuple):
    """What the scheduler knows about a queued frame."""

    night: str
    band: str
    target: str
    kind: str

    @property
    def is_calibration(self) -> bool:
        return self.kind in CALIBRATION_KINDS


class FrameQueue:
    """Frame ids in the order they go to the workers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._order: deque[int] = deque()
        # (night, band, target, kind) of queued frames, so that scheduling decisions
        # over a long queue do not read every frame back from the store.
        self._info: dict[int, Queued] = {}

    def __contains__(self, fid: object) -> bool:
        return fid in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[int]:
        return iter(self._order)

    def put(self, fid: int, info: Queued) -> None:
        """Queue a classified frame: calibration frames behind earlier ones, ahead of science."""
        self._info[fid] = info
        if fid in self._order:
            return
        if info.is_calibration:
            at = 0
            while at < len(self._order) and self.is_calibration(self._order[at]):
                at += 1
            self._order.insert(at, fid)
        else:
            self._order.append(fid)

    def requeue(self, fid: int) -> None:
        """Put a frame back in the queue (its state says so): measure it again."""
        self.store.set_state(fid, "queued", None)
        self._order.append(fid)

    def info(self, fid: int) -> Queued | None:
        """(night, band, target, kind) of a queued frame."""
        info = self._info.get(fid)
        if info is None:
            f = self.store.frame(fid)
            if f is None:
                return None
            info = self._info[fid] = Queued(f["night"], f["band"], f["target"], f["kind"])
        return info

    def is_calibration(self, fid: int) -> bool:
        info = self.info(fid)
        return info is not None and info.is_calibration

    def forget(self, fid: int) -> None:
        """The frame left the queue (dispatched, or no longer queued)."""
        self._info.pop(fid, None)

    def drain(self) -> Iterator[int]:
        """Take frames off the front one by one; :meth:`keep` what must wait."""
        while self._order:
            yield self._order.popleft()

    def keep(self, waiting: Iterable[int]) -> None:
        """After :meth:`drain`: the frames that wait, in their order."""
        self._order = deque(waiting)

    def clear(self) -> None:
        self._order.clear()

    def calibration_keys(self) -> set[tuple[str, str, str]]:
        """(night, band, kind) of the queued calibration frames."""
        out = set()
        for fid in self._order:
            info = self.info(fid)
            if info and info.is_calibration:
                out.add((info.night, info.band, info.kind))
        return out

    def science_curves(self) -> set[tuple[str, str]]:
        """(target, band) of the queued science frames."""
        out = set()
        for fid in self._order:
            info = self.info(fid)
            if info and not info.is_calibration:
                out.add((info.target, info.band))
        return out


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class ScienceJob:
    """A science frame a worker measures."""

    frame_id: int
    night: str
    band: str
    target: str
    calib_version: str  # the masters the worker was given
    sha256: str  # of the raw file it was started on: a result for replaced bytes is dropped

    @property
    def series(self) -> tuple[str, str, str]:
        return (self.night, self.band, self.target)


@dataclass(frozen=True)
class CalibrationJob:
    """A calibration frame whose header a worker rebuilds."""

    frame_id: int
    night: str
    band: str
    kind: str  # bias, flat or dark
    sha256: str


@dataclass(frozen=True, eq=False)
class MasterJob:
    """A master rebuild: the version it becomes, and the frame each input came from."""

    night: str
    band: str
    kind: str
    version: int
    id_by_output: dict[str, int]

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.night, self.band, self.kind)


Job = ScienceJob | CalibrationJob | MasterJob
STAGE_OF = {ScienceJob: "science", CalibrationJob: "calibration", MasterJob: "master"}


class InFlight:
    """The futures the pool is working on, each with its job."""

    def __init__(self) -> None:
        self._jobs: dict[cf.Future, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def add(self, future: cf.Future, job: Job) -> None:
        self._jobs[future] = job

    def pop(self, future: cf.Future) -> Job:
        return self._jobs.pop(future)

    def futures(self) -> list[cf.Future]:
        return list(self._jobs)

    def clear(self) -> list[Job]:
        """Forget every job (their pool is gone); returns them."""
        jobs = list(self._jobs.values())
        self._jobs.clear()
        return jobs

    def frame_ids(self) -> set[int]:
        """Frames a worker has in hand."""
        return {j.frame_id for j in self._jobs.values() if not isinstance(j, MasterJob)}

    def science_series(self) -> set[tuple[str, str, str]]:
        """(night, band, target) of the science frames being measured."""
        return {j.series for j in self._jobs.values() if isinstance(j, ScienceJob)}

    def science_curves(self) -> set[tuple[str, str]]:
        """(target, band) of the science frames being measured."""
        return {(j.target, j.band) for j in self._jobs.values() if isinstance(j, ScienceJob)}

    def calibration_bands(self) -> set[tuple[str, str]]:
        """(night, band) with a calibration frame or a master rebuild in hand."""
        return {(j.night, j.band) for j in self._jobs.values()
                if isinstance(j, CalibrationJob | MasterJob)}

    def master_keys(self) -> set[tuple[str, str, str]]:
        """(night, band, kind) being rebuilt, or with a calibration frame in hand."""
        return {(j.night, j.band, j.kind) for j in self._jobs.values()
                if isinstance(j, CalibrationJob | MasterJob)}
