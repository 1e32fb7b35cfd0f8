"""Catalog cones and target names, looked up off the main loop and kept.

A look-up (SIMBAD, Gaia through astroquery) can take seconds; the main loop
must not wait for it. Each look-up runs on one background thread; asking
again returns ``(False, None)`` until it has finished, then its result (or
the exception it raised). A local catalog file is read directly: it is fast.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterable
from typing import Any

from photd.obslog import LogEntry


def cone_key(radec: tuple[float, float]) -> tuple[float, float]:
    """Pointings closer than ~4" share one cone."""
    return (round(radec[0], 3), round(radec[1], 3))


class Lookups:
    """Reference-star cones and resolved names, cached for the daemon's lifetime."""

    def __init__(self, catalog: Any) -> None:
        self.catalog = catalog  # photd.catalog.CatalogSource
        self._cones: dict[tuple[float, float], Any] = {}
        self._names: dict[str, tuple[float, float] | None] = {}
        self._running: dict[tuple, cf.Future] = {}
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="catalog")

    def _lookup(self, key: tuple, fn: Callable, *args: Any) -> tuple[bool, Any]:
        """Run a look-up off the main loop: (finished, result or exception)."""
        fut = self._running.get(key)
        if fut is None:
            self._running[key] = self._pool.submit(fn, *args)
            return False, None
        if not fut.done():
            return False, None
        del self._running[key]
        exc = fut.exception()
        return True, exc if exc is not None else fut.result()

    def pointing(self, entry: LogEntry) -> tuple[bool, tuple[float, float] | None]:
        """The target's coordinates: the log's, else SIMBAD's through the cache."""
        if entry.ra_deg is not None and entry.dec_deg is not None:
            return True, (entry.ra_deg, entry.dec_deg)
        return self.resolved_name(entry.name)

    def resolved_name(self, name: str) -> tuple[bool, tuple[float, float] | None]:
        """SIMBAD's position for ``name`` through the on-disk cache: (finished, radec or None).

        None when SIMBAD does not know the name or cannot be reached (asked once
        per daemon run; the cache keeps answers across runs).
        """
        if name in self._names:
            return True, self._names[name]
        finished, got = self._lookup(("name", name), self.catalog.resolve_name, name)
        if not finished:
            return False, None
        self._names[name] = None if isinstance(got, BaseException) else got
        return True, self._names[name]

    def known_pointing(self, entry: LogEntry) -> tuple[float, float] | None:
        """The log's coordinates, else a name already resolved; never asks."""
        if entry.ra_deg is not None:
            return (entry.ra_deg, entry.dec_deg)
        return self._names.get(entry.name)

    def stars_for(self, radec: tuple[float, float]) -> tuple[bool, Any]:
        """Reference stars around a pointing: (finished, Table or CatalogUnavailable)."""
        key = cone_key(radec)
        if key in self._cones:
            return True, self._cones[key]
        if self.catalog.local_file is not None:
            got: Any = self.catalog.stars(*radec)  # a local file: fast, no network
        else:
            finished, got = self._lookup(("cone", *key), self.catalog.stars, *radec)
            if not finished:
                return False, None
        if not isinstance(got, BaseException):
            self._cones[key] = got
        return True, got

    def cached_stars(self, radec: tuple[float, float]) -> Any:
        """The cone already fetched around a pointing, or None; never asks."""
        return self._cones.get(cone_key(radec))

    def known_cone(self, entry: LogEntry | None) -> Any:
        """The cone already fetched for a log line's pointing, or None; never asks."""
        radec = self.known_pointing(entry) if entry is not None else None
        return None if radec is None else self.cached_stars(radec)

    def cone_at_hand(self, entry: LogEntry | None) -> bool:
        """Whether a log line's catalog cone is at hand (asking for it if not).

        After a restart the cones are fetched again off the main loop; a light
        curve derived before its cone arrives would lose its calibrated magnitudes.
        No line (none left in the logs): derive from what is stored.
        """
        if entry is None:
            return True
        ready, radec = self.pointing(entry)
        if not ready:
            return False
        return radec is None or self.stars_for(radec)[0]

    def curve_catalog(self, entry: LogEntry | None) -> Any:
        """The cone a target's light curve is derived with, or None (a relative curve)."""
        radec = self.known_pointing(entry) if entry is not None else self.any_cone()
        catalog = None if radec is None else self.cached_stars(radec)
        return None if isinstance(catalog, BaseException) else catalog

    def any_cone(self) -> tuple[float, float] | None:
        """The first pointing a cone was fetched for (a target with no log line left)."""
        return next(iter(self._cones), None)

    def prefetch(self, entries: Iterable[LogEntry]) -> None:
        """Fetch the cones of every target in the logs before their frames need them."""
        seen = set()
        for entry in entries:
            if entry.is_calibration or entry.name in seen:
                continue
            seen.add(entry.name)
            done, radec = self.pointing(entry)
            if done and radec is not None:
                self.stars_for(radec)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
