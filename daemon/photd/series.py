"""Series of a field no catalog covers: measured in a relative WCS.

Without reference stars a series (night, band, target) is registered to its
first frame, the *reference* (:func:`photd.pipeline.relative_reference`), so
that the differential light curve still flows. This room remembers each
series' reference and which series were measured that way, re-measures
frames registered to an earlier reference, and re-measures the whole series
against the catalog once one covers the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from photd.frame_queue import FrameQueue
from photd.pipeline import RELATIVE_REFERENCE, RelativeReference
from photd.store import Store

Series = tuple[str, str, str]  # (night, band, target)


class RelativeSeries:
    """References of fields without catalog, and the series measured against them."""

    def __init__(self, store: Store, queue: FrameQueue, log: Any) -> None:
        self.store = store
        self.queue = queue
        self.log = log
        self._references: dict[Series, RelativeReference] = {}
        self.measured: set[Series] = set()

    def reference(self, series: Series) -> RelativeReference | None:
        """The reference frame of a field without catalog, from memory or the store."""
        if series in self._references:
            return self._references[series]
        night, band, target = series
        for f in sorted(self.store.frames(night=night, band=band),
                        key=lambda f: f["frame_number"] or 0):
            if f["target"] != target or f["kind"] != "object":
                continue
            sol = self.store.solution(f["id"])
            if sol and sol["relative"] == RELATIVE_REFERENCE:
                ref = RelativeReference.from_json(sol["header"]["relative_reference"])
                self._references[series] = ref
                return ref
        return None

    def registered_to(self, series: Series, solution: dict) -> int | None:
        """The frame number a relative frame's solution was registered to."""
        ref = solution["header"].get("relative_reference")
        if ref:
            return ref.get("frame_number")
        known = self.reference(series)
        return known.frame_number if known is not None else None

    def frame_done(self, series: Series, fid: int, solution: dict) -> None:
        """A frame of a field without catalog finished: remember its series' reference."""
        self.measured.add(series)
        if solution.get("relative") != RELATIVE_REFERENCE:
            return
        ref = RelativeReference.from_json(solution["header"]["relative_reference"])
        known = self._references.get(series)
        self._references[series] = ref
        if known is not None and known.id == ref.id:
            return
        self.log.info("reference frame for a field without catalog", stage="solve",
                      frame=self.store.frame(fid)["path"], band=series[1], target=series[2],
                      n_stars=len(ref.stars["id"]),
                      target_sep_arcsec=round(ref.target_sep_arcsec, 2),
                      runner_up_arcsec=round(ref.runner_up_arcsec, 2))
        # Frames registered to an earlier reference (its frame was reset) measured
        # another star list: measure them again against this one.
        self.requeue(series, keep_reference=ref.id)

    def requeue(self, series: Series, keep_reference: str | None = None) -> int:
        """Measure a series' relative frames again (all, or those of another reference)."""
        night, band, target = series
        n = 0
        for f in self.store.frames(states=["done", "badfit"], night=night, band=band):
            if f["target"] != target or f["id"] in self.queue:
                continue
            sol = self.store.solution(f["id"])
            if not sol or not sol["relative"]:
                continue
            if keep_reference is not None and sol["header"].get("RELREFID") == keep_reference:
                continue
            self.queue.requeue(f["id"])
            n += 1
        return n

    def catalog_arrived(self, stars_of: Callable[[str], Any]) -> None:
        """A field measured without catalog now has one: measure its frames against it.

        ``stars_of(target)``: the catalog cone already fetched for the target, or None.
        """
        for series in sorted(self.measured):
            stars = stars_of(series[2])
            if stars is None or isinstance(stars, BaseException) or len(stars) == 0:
                continue
            n = self.requeue(series)
            self.measured.discard(series)
            self.log.info("catalog now covers the field: re-measuring absolutely",
                          stage="catalog", night=series[0], band=series[1], target=series[2],
                          n_frames=n)

    def resume(self) -> None:
        """Start-up: the series the store holds measured in a relative WCS."""
        for f in self.store.frames(states=["done", "badfit"]):
            if f["kind"] == "object" and f["target"]:
                sol = self.store.solution(f["id"])
                if sol and sol["relative"]:
                    self.measured.add((f["night"], f["band"], f["target"]))
