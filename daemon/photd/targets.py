"""Where the target is: identified once per night from what the observer gave.

Observers name a target in the log and type its coordinates rounded (the
paper's ``08:54:48 +20:06:30`` is 12" from OJ 287), or give the telescope's
pointing instead. Measured there, the target would be blank sky. The
position is therefore taken, in this order, from

1. the configuration's ``[targets]`` table (the observer's own list),
2. a reference-catalog row whose ``id`` or ``name`` is the target's name
   (compared without case, spaces or punctuation: ``OJ 287`` = ``OJ287``);
   that row *is* the target and never also a comparison or field star,
3. SIMBAD by name (through the on-disk cache, when online),
4. the log's coordinates,

and then refined on the first solved frame to the detected source nearest
that position, within ``photometry.target_search_arcsec``, when the choice is
unambiguous (:func:`refine`). Pure functions: tables in, positions out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

#: Where a position came from, best first (``TargetPosition.source``).
SOURCES = ("config", "catalog", "simbad", "log")

#: ``Refinement.status``: the nearest detection was taken; two were too close
#: to tell apart (the prior position is kept); nothing within reach.
REFINED, AMBIGUOUS, NOT_FOUND = "refined", "ambiguous", "not_found"


def name_key(name: str) -> str:
    """A target name compared without case, spaces or punctuation (``OJ 287`` -> ``oj287``)."""
    return re.sub(r"[\W_]+", "", str(name)).casefold()


def same_name(a: str, b: str) -> bool:
    """True when two spellings name the same target."""
    return bool(name_key(a)) and name_key(a) == name_key(b)


@dataclass(frozen=True)
class TargetPosition:
    """A target's position before refinement, and where it came from."""

    name: str
    ra_deg: float
    dec_deg: float
    source: str  # one of SOURCES
    catalog_id: str | None = None  # the catalog row that is the target, if any


def from_config(name: str, targets: Mapping[str, Sequence[float]]) -> TargetPosition | None:
    """The ``[targets]`` entry for ``name`` (any spelling), else None."""
    for key, radec in targets.items():
        if same_name(key, name):
            return TargetPosition(name, float(radec[0]), float(radec[1]), "config")
    return None


def catalog_rows_named(stars: Table, name: str) -> np.ndarray:
    """Boolean mask of the catalog rows whose ``id`` or ``name`` is ``name``."""
    mask = np.zeros(len(stars), bool)
    key = name_key(name)
    if not key:
        return mask
    for column in ("id", "name"):
        if column in stars.colnames:
            mask |= np.array([name_key(v) == key for v in stars[column]], bool)
    return mask


def from_catalog(name: str, stars: Table | None) -> TargetPosition | None:
    """The catalog row named like the target (the first, if several), else None."""
    if stars is None or len(stars) == 0:
        return None
    rows = np.flatnonzero(catalog_rows_named(stars, name))
    if len(rows) == 0:
        return None
    row = stars[int(rows[0])]
    return TargetPosition(name, float(row["ra"]), float(row["dec"]), "catalog",
                          catalog_id=str(row["id"]))


def choose_position(name: str, *, config_targets: Mapping[str, Sequence[float]],
                    stars: Table | None, simbad_radec: tuple[float, float] | None,
                    log_radec: tuple[float, float] | None) -> TargetPosition | None:
    """The best prior position of a target (module docstring, steps 1-4)."""
    found = from_config(name, config_targets) or from_catalog(name, stars)
    if found is not None:
        return found
    for source, radec in (("simbad", simbad_radec), ("log", log_radec)):
        if radec is not None and all(math.isfinite(v) for v in radec):
            return TargetPosition(name, float(radec[0]), float(radec[1]), source)
    return None


@dataclass(frozen=True)
class Refinement:
    """The position the target is measured at, with the evidence for it.

    ``offset_arcsec`` is the chosen source's distance from the prior position;
    ``runner_up_arcsec`` the next detection's (NaN when there is none).
    """

    ra_deg: float
    dec_deg: float
    status: str  # REFINED, AMBIGUOUS or NOT_FOUND
    offset_arcsec: float
    runner_up_arcsec: float


def _separation_arcsec(ra0: float, dec0: float, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Angular distance (arcsec) from one point to many (haversine)."""
    r0, d0, r, d = (np.radians(v) for v in (ra0, dec0, ra, dec))
    h = np.sin((d - d0) / 2) ** 2 + np.cos(d0) * np.cos(d) * np.sin((r - r0) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1)))) * 3600.0


def refine(prior: TargetPosition, ra_deg: np.ndarray, dec_deg: np.ndarray, *,
           search_arcsec: float, fwhm_arcsec: float) -> Refinement:
    """Move the target to the detected source nearest its prior position.

    A catalog, configuration or SIMBAD position is already right to well under
    a FWHM; a log position may be off by the observer's rounding or be the
    pointing. The nearest detection within ``search_arcsec`` is taken when the
    runner-up is clearly farther: by at least one FWHM and by a quarter of the
    nearest's own distance (two sources at similar distances from a rounded
    position cannot be told apart by position alone). Otherwise the prior
    position is kept and the status says why.

    Parameters
    ----------
    prior : TargetPosition
    ra_deg, dec_deg : array
        Detected sources' positions (deg) through the frame's solved WCS.
    search_arcsec : float
        ``photometry.target_search_arcsec``.
    fwhm_arcsec : float
        The frame's seeing: detections closer than this are one source.
    """
    ra = np.asarray(ra_deg, float)
    dec = np.asarray(dec_deg, float)
    d = _separation_arcsec(prior.ra_deg, prior.dec_deg, ra, dec) if len(ra) else np.array([])
    order = np.argsort(d)
    if len(order) == 0 or d[order[0]] > search_arcsec:
        nearest = float(d[order[0]]) if len(order) else math.nan
        return Refinement(prior.ra_deg, prior.dec_deg, NOT_FOUND, nearest, math.nan)
    best = int(order[0])
    nearest = float(d[best])
    runner_up = float(d[order[1]]) if len(order) > 1 else math.nan
    clear = not math.isfinite(runner_up) or (
        runner_up - nearest >= max(fwhm_arcsec, 0.25 * nearest))
    if not clear:
        return Refinement(prior.ra_deg, prior.dec_deg, AMBIGUOUS, nearest, runner_up)
    return Refinement(float(ra[best]), float(dec[best]), REFINED, nearest, runner_up)
