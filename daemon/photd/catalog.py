"""Reference catalogs: a local file, or online surveys through an on-disk cache.

The daemon must run a whole night without network (DESIGN.md, "Works
offline"). Two sources of reference stars, tried in this order:

1. a local catalog file (``paths.catalog`` / ``--catalog``; ECSV, FITS or CSV,
   the **local reference catalog contract**), read once and normalised by
   :func:`read_catalog_file`;
2. online services (Gaia DR3 for positions and proper motions, SDSS for
   g, r, i with Pan-STARRS as fallback) queried per sky tile and kept under
   ``<work>/catalog-cache`` as one ECSV per tile, reused on later nights.

When neither answers, :class:`CatalogUnavailable` (reason
``catalog_unavailable``) tells the daemon to let the frame wait and retry.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.table import MaskedColumn, Table, vstack

from photd.atomic import atomic_write, atomic_write_text
from photd.config import CatalogConfig

__all__ = [
    "CatalogError",
    "CatalogSource",
    "CatalogUnavailable",
    "COLUMNS",
    "catalog_from_sources",
    "cone",
    "normalise_catalog",
    "propagate_pm",
    "read_catalog_file",
]

BANDS = ("g", "r", "i")
COLUMNS = ("id", "ra", "dec", "g", "r", "i", "g_err", "r_err", "i_err", "G", "pmra",
           "pmdec", "epoch")

# Column spellings seen in survey exports, matched case-insensitively.
_ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "source_id", "objid", "obj_id", "objID", "name", "designation", "star_id"),
    "ra": ("ra", "ra_deg", "raj2000", "ra_icrs", "radeg", "_raj2000", "alpha_j2000"),
    "dec": ("dec", "dec_deg", "dej2000", "decj2000", "de_icrs", "dedeg", "_dej2000",
            "delta_j2000"),
    "G": ("G", "gaia_g", "phot_g_mean_mag", "gmag_gaia", "g_gaia"),
    "pmra": ("pmra", "pm_ra", "pmra_masyr", "pmracosdec"),
    "pmdec": ("pmdec", "pm_dec", "pmde", "pmdec_masyr"),
    "epoch": ("epoch", "ref_epoch", "epoch_jyear", "epoch_yr"),
}
for _b in BANDS:
    _ALIASES[_b] = (_b, f"{_b}mag", f"{_b}_mag", f"{_b}psfmag", f"{_b}_psf", f"psfmag_{_b}",
                    f"{_b}meanpsfmag", f"mag_{_b}", f"{_b}'")
    _ALIASES[f"{_b}_err"] = (f"{_b}_err", f"e_{_b}mag", f"{_b}mag_err", f"{_b}_mag_err",
                             f"err_{_b}", f"e_{_b}", f"{_b}err", f"psfmagerr_{_b}",
                             f"{_b}meanpsfmagerr", f"{_b}_magerr", f"e_{_b}_mag")


class CatalogError(ValueError):
    """A catalog file that cannot be used (unreadable, or without the needed columns)."""


class CatalogUnavailable(RuntimeError):
    """No reference stars for a field: nothing cached and the services did not answer.

    The daemon lets the frame wait (state reason ``catalog_unavailable``) and
    retries later.
    """

    reason = "catalog_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ---------------------------------------------------------------------------
# Reading and normalising
# ---------------------------------------------------------------------------

def _find(colnames: list[str], target: str) -> str | None:
    """The column of ``colnames`` that is a spelling of ``target``."""
    for alias in _ALIASES[target]:
        if alias in colnames:
            return alias
    lower = {c.lower(): c for c in colnames}
    for alias in _ALIASES[target]:
        col = lower.get(alias.lower())
        # SDSS g and Gaia G differ only by case ("gmag" vs VizieR's Gaia "Gmag").
        if col is None or (target in ("g", "g_err") and col.lstrip("eE_").startswith("G")):
            continue
        return col
    return None


def _as_float(col) -> np.ndarray:
    """A column as float with masked / empty / non-numeric entries as NaN."""
    if isinstance(col, MaskedColumn) or np.ma.isMaskedArray(col):
        data = np.ma.filled(np.ma.asarray(col).astype(float, copy=False), np.nan) \
            if np.asarray(col).dtype.kind in "fiu" else None
        if data is not None:
            return data
    arr = np.asarray(col)
    if arr.dtype.kind in "fiu":
        return arr.astype(float)
    out = np.full(len(arr), np.nan)
    for k, v in enumerate(arr):
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            pass
    return out


def normalise_catalog(table: Table, source: str = "catalog") -> Table:
    """Rename survey columns to photd's and fill the missing optional ones.

    Parameters
    ----------
    table : astropy.table.Table
        A catalog with any of the accepted spellings (see the local reference
        catalog contract in DESIGN.md).
    source : str
        Where it came from, for error messages.

    Returns
    -------
    astropy.table.Table
        Columns :data:`COLUMNS`: ``id`` (str), ``ra``, ``dec`` (deg),
        ``g``, ``r``, ``i``, ``*_err``, ``G`` (mag), ``pmra``, ``pmdec``
        (mas/yr), ``epoch`` (Julian year); missing values are NaN.

    Raises
    ------
    CatalogError
        Without ``ra``/``dec`` or without any magnitude column; the message
        names the source and lists the columns it has.
    """
    names = list(table.colnames)
    found = {key: _find(names, key) for key in _ALIASES}
    have = ", ".join(names) if names else "(none)"
    if found["ra"] is None or found["dec"] is None:
        raise CatalogError(f"{source}: no ra/dec columns (has: {have})")
    if all(found[b] is None for b in (*BANDS, "G")):
        raise CatalogError(f"{source}: no magnitude column for g, r, i or G (has: {have})")
    out = Table()
    n = len(table)
    if found["id"] is not None:
        ids = [str(v) for v in np.asarray(table[found["id"]])]
    else:
        ids = [str(k + 1) for k in range(n)]
    out["id"] = np.array(ids, dtype="U")  # text even when empty (an empty list is float)
    for key in COLUMNS[1:]:
        col = found.get(key)
        out[key] = _as_float(table[col]) if col is not None else np.full(n, np.nan)
    out["epoch"] = np.where(np.isfinite(out["epoch"]), out["epoch"], 2016.0)
    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]))
    if bad.any():
        out = out[~bad]
    for key, unit in (("ra", "deg"), ("dec", "deg"), ("pmra", "mas / yr"),
                      ("pmdec", "mas / yr")):
        out[key].unit = unit
    out.meta["source"] = source
    return out


def read_catalog_file(path: str | os.PathLike) -> Table:
    """Read a local reference catalog (ECSV, FITS or CSV) into photd's columns.

    Parameters
    ----------
    path : path
        The file. The format follows the extension (``.ecsv``, ``.fits``/
        ``.fit``/``.fits.gz``, ``.csv``/``.txt``); other names are tried as
        ECSV, FITS and CSV in turn.

    Returns
    -------
    astropy.table.Table
        See :func:`normalise_catalog`.

    Raises
    ------
    CatalogError
        If the file cannot be read or lacks ``ra``/``dec`` or every band.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".ecsv"):
        formats = ["ascii.ecsv"]
    elif name.endswith((".fits", ".fit", ".fts", ".fits.gz")):
        formats = ["fits"]
    elif name.endswith((".csv", ".txt")):
        formats = ["ascii.csv"]
    else:
        formats = ["ascii.ecsv", "fits", "ascii.csv"]
    errors = []
    for fmt in formats:
        try:
            table = Table.read(path, format=fmt)
            break
        except FileNotFoundError as exc:
            raise CatalogError(f"{path}: no such catalog file") from exc
        except Exception as exc:  # noqa: BLE001 - each reader fails its own way
            errors.append(f"{fmt}: {exc}")
    else:
        raise CatalogError(f"{path}: cannot read as {', '.join(formats)} ({'; '.join(errors)})")
    return normalise_catalog(table, str(path))


# ---------------------------------------------------------------------------
# Selections
# ---------------------------------------------------------------------------

def _separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance (deg); haversine, exact at small separations."""
    r1, d1, r2, d2 = map(np.radians, (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0, 1))))


def cone(table: Table, ra_deg: float, dec_deg: float, radius_arcmin: float) -> Table:
    """Rows of ``table`` within ``radius_arcmin`` of (``ra_deg``, ``dec_deg``)."""
    if len(table) == 0:
        return table.copy()
    sep = _separation_deg(ra_deg, dec_deg, np.asarray(table["ra"], float),
                          np.asarray(table["dec"], float))
    return table[sep <= radius_arcmin / 60.0]


def propagate_pm(table: Table, epoch_jyear: float) -> Table:
    """Move stars by their proper motion to the observation epoch.

    Parameters
    ----------
    table : astropy.table.Table
        Normalised catalog (``pmra`` is mu_alpha* = mu_alpha cos dec, mas/yr,
        as Gaia publishes it); a NaN proper motion counts as zero.
    epoch_jyear : float
        Observation epoch (Julian year, e.g. ``Time(...).jyear``).

    Returns
    -------
    astropy.table.Table
        A copy with ``ra``, ``dec`` at ``epoch_jyear`` and ``epoch`` set to it.
    """
    out = table.copy()
    if len(out) == 0:
        return out
    dt = epoch_jyear - np.where(np.isfinite(out["epoch"]), out["epoch"], epoch_jyear)
    pmra = np.nan_to_num(np.asarray(out["pmra"], float))
    pmdec = np.nan_to_num(np.asarray(out["pmdec"], float))
    dec = np.asarray(out["dec"], float)
    # Linear motion is good to far below a pixel over decades for any ordinary star.
    cosd = np.maximum(np.cos(np.radians(dec)), 1e-6)
    out["ra"] = (np.asarray(out["ra"], float) + pmra * dt / 3.6e6 / cosd) % 360.0
    out["dec"] = dec + pmdec * dt / 3.6e6
    out["epoch"] = np.full(len(out), float(epoch_jyear))
    out["ra"].unit = "deg"
    out["dec"].unit = "deg"
    return out


# ---------------------------------------------------------------------------
# The cache and the online services
# ---------------------------------------------------------------------------

FetchFn = Callable[[float, float, float, float], Table]
ResolveFn = Callable[[str, float], "tuple[float, float] | None"]


def _atomic_write_table(path: Path, table: Table) -> None:
    def write(fh) -> None:
        buf = io.StringIO()
        table.write(buf, format="ascii.ecsv")
        fh.write(buf.getvalue().encode("utf-8"))

    atomic_write(path, write)


def tile_key(ra_deg: float, dec_deg: float, tile_deg: float) -> tuple[int, int]:
    """Index (i_ra, i_dec) of the sky tile holding a position.

    Tiles are ``tile_deg`` high; in RA their width grows as 1/cos(dec) of the
    tile's equator-most edge so a tile never spans much more sky than asked.
    """
    j = math.floor((dec_deg + 90.0) / tile_deg)
    edge = min(abs(-90.0 + j * tile_deg), abs(-90.0 + (j + 1) * tile_deg))
    width = tile_deg / max(math.cos(math.radians(min(edge, 89.0))), 1e-3)
    n_ra = max(1, int(360.0 // width))
    i = int((ra_deg % 360.0) / (360.0 / n_ra)) % n_ra
    return i, j


def _tile_geometry(i: int, j: int, tile_deg: float) -> tuple[float, float, float]:
    """Centre (ra, dec) and circumscribed radius (deg) of a tile."""
    dec_lo, dec_hi = -90.0 + j * tile_deg, -90.0 + (j + 1) * tile_deg
    edge = min(abs(dec_lo), abs(dec_hi))
    width_ra = 360.0 / max(1, int(360.0 // (tile_deg / max(math.cos(math.radians(min(edge,
                                                                               89.0))),
                                                             1e-3))))
    ra_c = (i + 0.5) * width_ra
    dec_c = max(min((dec_lo + dec_hi) / 2.0, 90.0), -90.0)
    half_w = 0.5 * width_ra * math.cos(math.radians(min(abs(dec_lo), abs(dec_hi))))
    radius = math.hypot(half_w, tile_deg / 2.0) * 1.01
    return ra_c, dec_c, radius


def _tiles_for_cone(ra_deg: float, dec_deg: float, radius_deg: float,
                    tile_deg: float) -> list[tuple[int, int]]:
    """Tiles overlapping a cone: sampled inside it and along its rim, finer than a tile."""
    keys = {tile_key(ra_deg, dec_deg, tile_deg)}
    cosd = max(math.cos(math.radians(dec_deg)), 1e-3)
    step = tile_deg / 3.0
    n = int(math.ceil(radius_deg / step))
    points = [(a * step, b * step) for a in range(-n, n + 1) for b in range(-n, n + 1)
              if math.hypot(a * step, b * step) <= radius_deg]
    rim = max(16, int(2 * math.pi * radius_deg / step) + 1)
    points += [(radius_deg * math.cos(2 * math.pi * k / rim),
                radius_deg * math.sin(2 * math.pi * k / rim)) for k in range(rim)]
    for dx, dy in points:
        dd = dec_deg + dy
        if abs(dd) <= 90:
            keys.add(tile_key(ra_deg + dx / cosd, dd, tile_deg))
    return sorted(keys)


class CatalogSource:
    """Reference stars for a field: a local file, else cached online cones.

    Parameters
    ----------
    cfg : CatalogConfig
        Timeouts, retries, cone radius, tile size.
    work_dir : path
        The daemon's work folder; the cache is ``cfg.cache_dir`` or
        ``<work_dir>/catalog-cache``.
    local_file : path, optional
        A local reference catalog: used alone, no network at all.
    fetch : callable, optional
        ``fetch(ra_deg, dec_deg, radius_deg, timeout_s) -> Table`` returning
        survey rows for a cone (any accepted spellings). Default:
        :func:`fetch_online` (Gaia DR3 + SDSS, Pan-STARRS fallback). Tests
        pass a function that raises to simulate an outage.
    resolver : callable, optional
        ``resolver(name, timeout_s) -> (ra_deg, dec_deg) | None``; default
        :func:`resolve_simbad`.
    sleep : callable
        Used between retries (tests pass a no-op).
    clock : callable
        Monotonic seconds, for the retry hold-off.
    """

    def __init__(self, cfg: CatalogConfig, work_dir: str | os.PathLike, *,
                 local_file: str | os.PathLike | None = None,
                 fetch: FetchFn | None = None, resolver: ResolveFn | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else Path(work_dir) / "catalog-cache"
        self.local_file = Path(local_file) if local_file else None
        self._fetch = fetch or fetch_online
        self._resolver = resolver or resolve_simbad
        self._sleep = sleep
        self._clock = clock
        self._local: Table | None = None
        self._tiles: dict[tuple[int, int], Table] = {}
        self._failed_at: float | None = None

    # -- stars ---------------------------------------------------------------

    def stars(self, ra_deg: float, dec_deg: float, radius_arcmin: float | None = None, *,
              epoch_jyear: float | None = None) -> Table:
        """Reference stars within ``radius_arcmin`` of a position.

        Parameters
        ----------
        ra_deg, dec_deg : float
            Cone centre (deg, ICRS).
        radius_arcmin : float, optional
            Cone radius (arcmin); default ``cfg.radius_arcmin``.
        epoch_jyear : float, optional
            Move stars by proper motion to this epoch (Julian year).

        Raises
        ------
        CatalogUnavailable
            No local file, nothing cached for part of the cone, and the online
            services failed (or failed less than ``cfg.retry_after_s`` ago).
        CatalogError
            The local file is unusable (a configuration problem).
        """
        radius_arcmin = self.cfg.radius_arcmin if radius_arcmin is None else radius_arcmin
        if self.local_file is not None:
            if self._local is None:
                self._local = read_catalog_file(self.local_file)
            table = cone(self._local, ra_deg, dec_deg, radius_arcmin)
        else:
            keys = _tiles_for_cone(ra_deg, dec_deg, radius_arcmin / 60.0, self.cfg.tile_deg)
            parts = [self._tile(k) for k in keys]
            merged = vstack(parts, metadata_conflicts="silent") if parts else Table()
            table = cone(merged, ra_deg, dec_deg, radius_arcmin) if len(merged) else merged
        if self.cfg.max_mag and len(table):
            mags = np.column_stack([np.asarray(table[b], float) for b in (*BANDS, "G")])
            with np.errstate(invalid="ignore"):
                brightest = np.where(np.isfinite(mags), mags, np.inf).min(axis=1)
            # Stars fainter than max_mag in every band only slow the matching down.
            table = table[~(np.isfinite(brightest) & (brightest > self.cfg.max_mag))]
        if epoch_jyear is not None:
            table = propagate_pm(table, epoch_jyear)
        return table

    def _tile_path(self, key: tuple[int, int]) -> Path:
        return self.cache_dir / f"tile_{self.cfg.tile_deg:g}_{key[0]}_{key[1]}.ecsv"

    def _tile(self, key: tuple[int, int]) -> Table:
        if key in self._tiles:
            return self._tiles[key]
        path = self._tile_path(key)
        if path.exists():
            try:
                table = normalise_catalog(Table.read(path, format="ascii.ecsv"), str(path))
                table = table[self._in_tile(table, key)]
                self._tiles[key] = table
                return table
            except Exception:  # noqa: BLE001 - a damaged cache file is fetched again
                path.unlink(missing_ok=True)
        ra_c, dec_c, radius = _tile_geometry(*key, self.cfg.tile_deg)
        raw = self._call_with_retries(
            lambda: self._fetch(ra_c, dec_c, radius, self.cfg.timeout_s),
            f"catalog tile {key} (ra {ra_c:.3f}, dec {dec_c:+.3f}, r {radius * 60:.1f}')")
        table = normalise_catalog(raw, f"online tile {key}") if len(raw) else _empty()
        # The query cone circumscribes the tile: keep only the tile's own stars so that
        # neighbouring tiles never hold the same star twice.
        table = table[self._in_tile(table, key)]
        table.meta["fetched_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _atomic_write_table(path, table)
        self._tiles[key] = table
        return table

    def _in_tile(self, table: Table, key: tuple[int, int]) -> np.ndarray:
        return np.array([tile_key(float(r), float(d), self.cfg.tile_deg) == key
                         for r, d in zip(table["ra"], table["dec"], strict=True)], bool)

    def _call_with_retries(self, call: Callable, what: str):
        now = self._clock()
        if self._failed_at is not None and now - self._failed_at < self.cfg.retry_after_s:
            raise CatalogUnavailable(
                f"{what}: not cached, and the catalog services failed "
                f"{now - self._failed_at:.0f} s ago (next try after {self.cfg.retry_after_s:g} s)")
        delay = self.cfg.backoff_s
        last: Exception | None = None
        for attempt in range(max(1, self.cfg.retries)):
            try:
                result = call()
                self._failed_at = None
                return result
            except Exception as exc:  # noqa: BLE001 - timeouts, HTTP and parse errors alike
                last = exc
                if attempt + 1 < self.cfg.retries:
                    self._sleep(delay)
                    delay *= 2
        self._failed_at = self._clock()
        raise CatalogUnavailable(f"{what}: not cached and the catalog services failed after "
                                 f"{max(1, self.cfg.retries)} tries ({last!r})")

    # -- names -----------------------------------------------------------------

    def resolve_name(self, name: str) -> tuple[float, float] | None:
        """Coordinates (ra_deg, dec_deg) of a named object (SIMBAD, cached).

        Returns None when SIMBAD does not know the name (also cached, so an
        unknown name is not asked about every frame).

        Raises
        ------
        CatalogUnavailable
            Not cached and SIMBAD did not answer.
        """
        path = self.cache_dir / "names.json"
        key = re.sub(r"\s+", " ", name.strip()).upper()
        names = _read_json(path)
        if key in names:
            value = names[key]
            return None if value is None else (float(value[0]), float(value[1]))
        result = self._call_with_retries(lambda: self._resolver(name, self.cfg.timeout_s),
                                         f"name {name!r}")
        names = _read_json(path)  # another process may have added names meanwhile
        names[key] = None if result is None else [float(result[0]), float(result[1])]
        atomic_write_text(path, json.dumps(names, indent=1, sort_keys=True))
        return None if result is None else (float(result[0]), float(result[1]))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _empty() -> Table:
    out = Table()
    out["id"] = np.zeros(0, dtype="U24")
    for key in COLUMNS[1:]:
        out[key] = np.zeros(0)
    return out


def catalog_from_sources(sources: Table, wcs, *, band: str, max_stars: int = 80) -> Table:
    """A stand-in catalog made from one frame's own detections (no survey covers the field).

    The stars are the frame's brightest isolated, unsaturated, star-like
    detections, placed on the sky by ``wcs``; ids are ``R<band>-<n>`` (``n``
    by brightness) and the magnitude columns are NaN: the stars serve as
    positions to measure and as comparison stars, never as a zero point.

    Parameters
    ----------
    sources : astropy.table.Table
        :func:`photd.astrometry.detect_sources` rows (``x``, ``y``, brightest
        first; ``sharp``, ``saturated``, ``isolated`` when present).
    wcs : astropy.wcs.WCS
        The frame's WCS (for a field without catalog: the header's guess).
    band : str
        The camera's band, part of the ids.
    max_stars : int
        Keep at most this many.
    """
    ok = np.ones(len(sources), bool)
    for col, want in (("sharp", False), ("saturated", False), ("isolated", True)):
        if col in sources.colnames:
            ok &= np.asarray(sources[col], bool) == want
    if "flux" in sources.colnames:
        ok &= np.asarray(sources["flux"], float) > 0
    rows = sources[ok][:max_stars]
    ra, dec = wcs.all_pix2world(np.asarray(rows["x"], float), np.asarray(rows["y"], float), 0)
    out = Table({"id": [f"R{band}-{k + 1:03d}" for k in range(len(rows))]}, dtype=["U24"])
    out["ra"] = np.asarray(ra, float)
    out["dec"] = np.asarray(dec, float)
    for key in COLUMNS[3:]:
        out[key] = np.full(len(rows), np.nan)
    return out


# ---------------------------------------------------------------------------
# The online services (not exercised by the tests: they never touch the network)
# ---------------------------------------------------------------------------

def fetch_online(ra_deg: float, dec_deg: float, radius_deg: float, timeout_s: float) -> Table:
    """Gaia DR3 positions and proper motions joined with SDSS (or Pan-STARRS) g, r, i.

    Parameters
    ----------
    ra_deg, dec_deg : float
        Cone centre (deg).
    radius_deg : float
        Cone radius (deg).
    timeout_s : float
        Per-request timeout (s).

    Returns
    -------
    astropy.table.Table
        Rows with ``source_id``, ``ra``, ``dec``, ``phot_g_mean_mag``,
        ``pmra``, ``pmdec``, ``ref_epoch`` and ``g``, ``r``, ``i`` (+ errors)
        where a survey star lies within 1" of the Gaia star.
    """
    import astropy.units as u
    from astropy.coordinates import SkyCoord
    from astroquery.vizier import Vizier

    centre = SkyCoord(ra_deg * u.deg, dec_deg * u.deg)
    radius = radius_deg * u.deg
    # VizieR serves all three surveys with one client and an honest timeout.
    viz = Vizier(columns=["Source", "RA_ICRS", "DE_ICRS", "pmRA", "pmDE", "Gmag"],
                 row_limit=-1, timeout=timeout_s)
    gaia = viz.query_region(centre, radius=radius, catalog="I/355/gaiadr3")
    if not gaia:
        return _empty()
    g = gaia[0]
    out = Table()
    out["source_id"] = [str(v) for v in g["Source"]]
    out["ra"] = np.asarray(g["RA_ICRS"], float)
    out["dec"] = np.asarray(g["DE_ICRS"], float)
    out["phot_g_mean_mag"] = np.ma.filled(np.ma.asarray(g["Gmag"], float), np.nan)
    out["pmra"] = np.ma.filled(np.ma.asarray(g["pmRA"], float), np.nan)
    out["pmdec"] = np.ma.filled(np.ma.asarray(g["pmDE"], float), np.nan)
    out["ref_epoch"] = np.full(len(out), 2016.0)
    for b in BANDS:
        out[b] = np.full(len(out), np.nan)
        out[f"{b}_err"] = np.full(len(out), np.nan)
    surveys = (("V/154/sdss16", {b: (f"{b}mag", f"e_{b}mag") for b in BANDS}, "RA_ICRS",
                "DE_ICRS"),
               ("II/349/ps1", {b: (f"{b}mag", f"e_{b}mag") for b in BANDS}, "RAJ2000",
                "DEJ2000"))
    for cat, cols, rcol, dcol in surveys:
        flat = [c for pair in cols.values() for c in pair]
        sv = Vizier(columns=[rcol, dcol, *flat], row_limit=-1, timeout=timeout_s)
        res = sv.query_region(centre, radius=radius, catalog=cat)
        if not res or len(res[0]) == 0:
            continue
        s = res[0]
        sc = SkyCoord(np.asarray(s[rcol], float) * u.deg, np.asarray(s[dcol], float) * u.deg)
        idx, d2d, _ = SkyCoord(out["ra"] * u.deg, out["dec"] * u.deg).match_to_catalog_sky(sc)
        ok = d2d.arcsec < 1.0
        for b, (mcol, ecol) in cols.items():
            out[b][ok] = np.ma.filled(np.ma.asarray(s[mcol], float), np.nan)[idx[ok]]
            out[f"{b}_err"][ok] = np.ma.filled(np.ma.asarray(s[ecol], float), np.nan)[idx[ok]]
        break  # SDSS answered: Pan-STARRS only where SDSS has no coverage
    return out


def resolve_simbad(name: str, timeout_s: float) -> tuple[float, float] | None:
    """SIMBAD name resolution; None when the name is unknown."""
    from astroquery.simbad import Simbad

    simbad = Simbad()
    simbad.TIMEOUT = timeout_s
    result = simbad.query_object(name)
    if result is None or len(result) == 0:
        return None
    cols = {c.lower(): c for c in result.colnames}
    if "ra" in cols and "dec" in cols and result[cols["ra"]].dtype.kind == "f":
        return float(result[cols["ra"]][0]), float(result[cols["dec"]][0])
    from astropy.coordinates import SkyCoord

    c = SkyCoord(str(result[cols["ra"]][0]), str(result[cols["dec"]][0]),
                 unit=("hourangle", "deg"))
    return float(c.ra.deg), float(c.dec.deg)
