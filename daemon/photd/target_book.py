"""The night's target decisions: where each target is measured, decided once, kept.

The first solved frame of a target on a night refines its prior position
(:mod:`photd.targets`) and the result is stored with its evidence (table
``targets``); every later frame of the night, in every band, is measured
there. Frames that were already with a worker when the decision was made
refined on their own; one that landed elsewhere is measured again.
"""

from __future__ import annotations

import math
from typing import Any

from astropy.table import Table

from photd import targets
from photd.config import Config
from photd.lookups import Lookups
from photd.obslog import LogEntry
from photd.store import Store

#: A frame's own refinement this far (arcsec) from the night's decision measured
#: another place: it is measured again (centroid noise is ~0.1").
_DISAGREE_ARCSEC = 1.0


class TargetBook:
    """Priors for frames in flight and the decisions the store keeps."""

    def __init__(self, cfg: Config, store: Store, lookups: Lookups, log: Any) -> None:
        self.cfg = cfg
        self.store = store
        self.lookups = lookups
        self.log = log

    def for_frame(self, night: str, entry: LogEntry, stars: Table | None,
                  ) -> tuple[targets.TargetPosition | None, str | None]:
        """The position to measure at and the decision's status (None: not decided yet).

        Without a decision, the best prior: the ``[targets]`` table, a catalog
        row named like the target, SIMBAD (only if its answer is already here:
        a frame never waits for the network), the log's coordinates.
        """
        decided = self.store.target_decision(night, entry.name)
        if decided is not None:
            return targets.TargetPosition(entry.name, decided["ra_deg"], decided["dec_deg"],
                                          decided["source"], decided["catalog_id"]), \
                decided["status"]
        simbad = None
        if targets.from_config(entry.name, self.cfg.targets) is None and \
                targets.from_catalog(entry.name, stars) is None:
            _finished, simbad = self.lookups.resolved_name(entry.name)
        log_radec = (entry.ra_deg, entry.dec_deg) if entry.has_coordinates else None
        return targets.choose_position(entry.name, config_targets=self.cfg.targets,
                                       stars=stars, simbad_radec=simbad,
                                       log_radec=log_radec), None

    def record(self, night: str, target: str, frame: dict, evidence: dict | None) -> bool:
        """Keep a frame's refinement as the night's decision; True if the frame must be redone.

        ``evidence`` is :attr:`photd.pipeline.FrameResult.target` (None when the
        frame was measured at a decision already made).
        """
        if evidence is None:
            return False
        fields = {k: evidence[k] for k in ("ra_deg", "dec_deg", "source", "catalog_id",
                                           "prior_ra_deg", "prior_dec_deg", "status",
                                           "offset_arcsec", "runner_up_arcsec")}
        if self.store.record_target(night, target, frame_id=frame["id"], **fields):
            level = "info" if evidence["status"] == targets.REFINED else "warning"
            getattr(self.log, level)(
                "target identified" if level == "info" else "target position not confirmed",
                stage="photometry", frame=frame["path"], target=target, night=night,
                source=evidence["source"], reason=evidence["status"],
                ra_deg=round(evidence["ra_deg"], 6), dec_deg=round(evidence["dec_deg"], 6),
                offset_arcsec=_rounded(evidence["offset_arcsec"]),
                runner_up_arcsec=_rounded(evidence["runner_up_arcsec"]))
            return False
        decided = self.store.target_decision(night, target)
        return _distance_arcsec(decided, evidence) > _DISAGREE_ARCSEC

    def forget(self, night: str, target: str) -> None:
        """Drop a night's decision (e.g. its log line changed)."""
        self.store.forget_target(night, target)


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _distance_arcsec(a: dict, b: dict) -> float:
    """Small-angle distance between two rows with ``ra_deg``/``dec_deg``."""
    dra = (a["ra_deg"] - b["ra_deg"]) * math.cos(math.radians(a["dec_deg"]))
    return math.hypot(dra, a["dec_deg"] - b["dec_deg"]) * 3600.0
