"""Reading commands: ``photd status``, ``tail``, ``export`` and ``plot``.

They open the store read-only, so they work while the daemon writes (WAL),
and need nothing but the store: comparison-star curves and the check star
come from the measurements the store keeps of every catalog star, so no
catalog (and no online service) is asked.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from photd import __version__
from photd import export as ex
from photd.config import Config
from photd.headers import obs_start
from photd.obslog import slug
from photd.store import Store
from photd.workdir import pause_marker, store_path

#: Frame states whose frames of a series have no light-curve point, marked on plots.
NO_POINT_STATES = ("badfit", "failed", "rejected")


def _open(cfg: Config) -> Store | None:
    path = store_path(cfg.work_dir)
    if not path.exists():
        print(f"photd: no store in {cfg.work_dir} (has `photd run --work "
              f"{cfg.work_dir}` run?)", file=sys.stderr)
        return None
    return Store.open_readonly(path)


def status(cfg: Config, *, as_json: bool = False) -> int:
    """Print frame counts per state and the frames that need attention."""
    store = _open(cfg)
    if store is None:
        return 1
    with store:
        data = store.status_json()
    if as_json:
        print(json.dumps(data, indent=1))
        return 0
    paused = _paused(cfg)
    if paused:
        print(paused)
    total = sum(data["counts"].values())
    print(f"{total} frames: " + ", ".join(f"{n} {s}" for s, n in sorted(data["counts"].items())))
    for f in data["frames"]:
        if f["state"] not in ("done", "calibration"):
            print(f"  {f['state']:<15} {f['band'] or '-'}  {f['path']}"
                  + (f"  ({f['reason']})" if f["reason"] else ""))
    return 0


def _paused(cfg: Config) -> str:
    """A loud line when the daemon has paused intake for lack of disk, else ""."""
    try:
        info = json.loads(pause_marker(cfg.work_dir).read_text())
    except (OSError, ValueError):
        return ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since", 0))))
    return (f"INTAKE PAUSED since {since}: the work disk had {info.get('free_mb')} MB free, "
            f"below daemon.min_free_disk_mb = {info.get('min_free_disk_mb')}; new frames are "
            f"not taken in until there is room")


# ---------------------------------------------------------------------------- series


def name_key(name: str) -> str:
    """A target name compared without case, spacing or punctuation (``oj 287`` = ``OJ287``)."""
    text = unicodedata.normalize("NFKC", str(name)).casefold()
    return re.sub(r"[\W_]+", "", text)


class UnknownSeries(LookupError):
    """No series matches the asked target (or band); the message lists those there are."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def series_index(store: Store) -> dict[str, dict[str, int]]:
    """Target -> band -> number of light-curve points, for every science target seen."""
    index: dict[str, dict[str, int]] = {}
    for f in store.frames():
        if f["kind"] == "object" and f["target"]:
            index.setdefault(f["target"], {}).setdefault(f["band"] or "?", 0)
    for (target, band), n in _point_counts(store).items():
        index.setdefault(target, {})[band] = n
    return index


def _point_counts(store: Store) -> dict[tuple[str, str], int]:
    rows = store.conn.execute(
        "SELECT target, band, count(*) FROM lightcurve GROUP BY target, band").fetchall()
    return {(str(t), str(b)): int(n) for t, b, n in rows}


def waiting_for_log(store: Store) -> int:
    """How many frames wait for an observing-log line to cover them."""
    return int(store.counts().get("waiting_log", 0))


def _listing(index: dict[str, dict[str, int]]) -> str:
    if not index:
        return "the store has no science targets yet"
    lines = ["targets in the store (points per band):"]
    for target in sorted(index, key=name_key):
        bands = ", ".join(f"{b} {index[target][b]}" for b in sorted(index[target], key=band_order))
        lines.append(f"  {target:<20} {bands}")
    return "\n".join(lines)


def resolve_series(store: Store, target: str, band: str | None) -> tuple[str, str | None]:
    """The stored target name (and band) a user's ``target`` and ``--band`` mean.

    Raises
    ------
    UnknownSeries
        With the targets and bands there are: exit code 2 (bad usage) when
        nothing can match, 1 when frames still wait for the log (the target
        may be among them).
    """
    index = series_index(store)
    waiting = waiting_for_log(store)
    hint = (f"\n{waiting} frames wait for the observing log (state waiting_log); their "
            "targets are known once a log line covers them" if waiting else "")
    matches = [t for t in index if t == target] or \
        [t for t in index if name_key(t) == name_key(target)]
    if len(matches) != 1:
        what = "matches several targets" if matches else "is not a target in the store"
        raise UnknownSeries(f"photd: {target!r} {what}\n{_listing(index)}{hint}",
                            1 if waiting and not matches else 2)
    name = matches[0]
    if band is None:
        return name, None
    bands = index[name]
    chosen = [b for b in bands if b == band] or \
        [b for b in bands if b.casefold() == band.casefold()]
    if len(chosen) != 1:
        raise UnknownSeries(f"photd: {name} has no band {band!r}; its bands: "
                            f"{', '.join(sorted(bands, key=band_order)) or 'none yet'}{hint}", 2)
    return name, chosen[0]


def series_rows(store: Store, target: str, band: str | None) -> list[dict]:
    """A target's light-curve rows with the observer's frame number as ``frame``."""
    rows = store.lightcurve(target, band)
    # By time, then the cameras' order: an exposure reads g, r, i.
    rows.sort(key=lambda r: (ex._finite(r.get("mjd")) or 0.0, band_order(r["band"]),
                             r["frame_id"]))
    for r in rows:
        r["frame"] = r.get("frame_number")  # the observer's frame number, not our row id
        r.pop("path", None)  # the raw file: the store's business, not the report's
    return rows


def _by_band(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["band"], []).append(r)
    return {b: out[b] for b in sorted(out, key=band_order)}


def band_order(band: str) -> tuple[int, str]:
    """Sort key: the cameras' g, r, i first, then any other band by name."""
    return ("gri".find(band) % 9, band)


# ------------------------------------------------------------ measurements of the series


@dataclass
class SeriesStars:
    """Instrumental magnitudes of every star on a series' frames (one band).

    ``inst[star][frame_id] = (mag_inst, mag_inst_err)`` for clean rows
    (flags 0, finite magnitude); ``ens[frame_id]`` is the ensemble's
    instrumental level on the frame (up to a constant), read back from the
    target's row: target instrumental minus its differential magnitude.
    """

    inst: dict[str, dict[int, tuple[float, float]]]
    target_inst: dict[int, float]
    ens: dict[int, float]


def series_stars(store: Store, target: str, band: str, rows: list[dict]) -> SeriesStars:
    """Read the per-star measurements behind one band's curve."""
    frame_ids = {int(r["frame_id"]) for r in rows}
    inst: dict[str, dict[int, tuple[float, float]]] = {}
    target_inst: dict[int, float] = {}
    for m in store.measurements_for(target=target, band=band):
        fid = int(m["frame_id"])
        if fid not in frame_ids:
            continue
        mag, err = ex._finite(m["mag_inst"]), ex._finite(m["mag_inst_err"])
        if mag is None:
            continue
        if m["star_id"] == target:
            target_inst[fid] = mag
        elif not m["flags"] and err is not None:
            inst.setdefault(str(m["star_id"]), {})[fid] = (mag, err)
    ens = {}
    for r in rows:
        fid, diff = int(r["frame_id"]), ex._finite(r.get("diff_mag"))
        if fid in target_inst and diff is not None:
            ens[fid] = target_inst[fid] - diff
    return SeriesStars(inst, target_inst, ens)


def choose_check_star(stars: SeriesStars, rows: list[dict], cfg: Config,
                      ) -> tuple[ex.CheckStar | None, str]:
    """The check star of a curve, chosen the same way every time, and why.

    Candidates are the stars measured clean on every frame with a point, not
    in the ensemble (a check inside the ensemble would check nothing), not
    the target, with a median error within twice
    ``photometry.comparison_max_err_mag`` and a reduced chi^2 against the
    ensemble within ``photometry.comparison_max_chi2`` (constant, as a
    comparison must be: the field's variables fail here). Of those, the one
    nearest the target in magnitude; ties by id.

    Returns
    -------
    (CheckStar or None, str)
        The star (None when no star qualifies) and the reason, for the report.
    """
    frames = sorted(stars.ens)
    if not frames:
        return None, "no frame with a point"
    ensemble = {c for r in rows for c in ex.comparison_list(r)}
    t_level = float(np.mean([stars.target_inst[f] for f in frames]))
    pho = cfg.photometry
    clean, steady = 0, []
    for sid, meas in sorted(stars.inst.items()):
        if sid in ensemble or any(f not in meas for f in frames):
            continue
        mags = np.array([meas[f][0] for f in frames])
        errs = np.array([meas[f][1] for f in frames])
        if float(np.median(errs)) > 2 * pho.comparison_max_err_mag:
            continue
        clean += 1
        d = mags - np.array([stars.ens[f] for f in frames])
        chi2 = float(np.sum(((d - d.mean()) / errs) ** 2)) / max(len(d) - 1, 1)
        if chi2 <= pho.comparison_max_chi2:
            steady.append((round(abs(float(mags.mean()) - t_level), 3), sid, chi2))
    if not steady:
        return None, (f"none: of {clean} stars clean on all {len(frames)} frames outside the "
                      f"ensemble none has reduced chi2 <= {pho.comparison_max_chi2:g}")
    dmag, sid, chi2 = min(steady)
    return ex.CheckStar(sid, f"of {len(steady)} steady stars clean on all {len(frames)} frames "
                             f"outside the ensemble, the nearest in brightness to the target: "
                             f"{dmag:.2f} mag from it, reduced chi2 {chi2:.1f}"), ""


def add_check_star(rows: list[dict], stars: SeriesStars, check: ex.CheckStar | None) -> None:
    """Give each row the check star's magnitude measured like the target's.

    ``check_mag = mag + (k_inst - target_inst)``: the check against the same
    ensemble on the same frame, on the target's magnitude scale (exact for a
    curve without colour term; with one, off by a constant term x colour difference).
    """
    for r in rows:
        fid = int(r["frame_id"])
        t_inst = stars.target_inst.get(fid)
        if t_inst is not None:
            r["mag_inst"] = t_inst
        if check is None:
            continue
        r["check_star"] = check.star_id
        k = stars.inst.get(check.star_id, {}).get(fid)
        mag = ex._finite(r.get("mag"))
        if k is not None and t_inst is not None:
            r["check_mag_inst"] = k[0]
            r["check_mag"] = mag + (k[0] - t_inst) if mag is not None else None


def comparison_curves(stars: SeriesStars, rows: list[dict]) -> dict[str, list[tuple]]:
    """Each comparison star against the mean of the others (mean removed), per frame."""
    ensemble = sorted({c for r in rows for c in ex.comparison_list(r)})
    comps = {c: stars.inst[c] for c in ensemble if c in stars.inst}
    level = {c: float(np.mean([v[0] for v in m.values()])) for c, m in comps.items()}
    mjd = {int(r["frame_id"]): float(r["mjd"]) for r in rows if ex._finite(r.get("mjd"))}
    out: dict[str, list[tuple]] = {}
    for c, meas in comps.items():
        pts = []
        for fid, (mag, err) in sorted(meas.items()):
            others = [(comps[o][fid][0] - level[o], comps[o][fid][1]) for o in comps
                      if o != c and fid in comps[o]]
            if not others or fid not in mjd:
                continue
            ref = float(np.mean([o[0] for o in others]))
            ref_err = math.sqrt(sum(o[1] ** 2 for o in others)) / len(others)
            pts.append((mjd[fid], mag - level[c] - ref, math.hypot(err, ref_err)))
        if pts:
            mean = float(np.mean([p[1] for p in pts]))
            out[c] = [(t, d - mean, e) for t, d, e in pts]
    return out


def frame_marks(store: Store, target: str, band: str) -> list[ex.FrameMark]:
    """The series' frames without a point (badfit, rejected, failed), timed from their header."""
    marks = []
    for f in store.frames(states=NO_POINT_STATES, band=band):
        if f["target"] != target:
            continue
        try:
            header = fits.getheader(f["output"] or f["path"])
        except (OSError, ValueError):
            continue  # the file is gone: nothing to place on the time axis
        start = obs_start(header)
        if start is None:
            continue
        exptime = ex._finite(header.get("EXPTIME")) or 0.0
        marks.append(ex.FrameMark(float(start.mjd) + max(exptime, 0.0) / 2 / 86400.0, band,
                                  f["state"], f["reason"] or "", f["frame_number"]))
    return marks


def zero_points(store: Store, rows: list[dict]) -> list[tuple[float, float, float]]:
    """(mjd, zero point, error) of each frame of the curve with a stored zero point."""
    out = []
    for r in rows:
        zp = store.zeropoint(int(r["frame_id"]))
        if zp and ex._finite(zp.get("zp")) is not None and ex._finite(r.get("mjd")):
            out.append((float(r["mjd"]), float(zp["zp"]), ex._finite(zp.get("zp_err")) or 0.0))
    return out


def _transformed(store: Store, rows: list[dict]) -> bool:
    """True when every row's frame records a colour transformation (a non-zero term)."""
    terms = [(store.zeropoint(int(r["frame_id"])) or {}).get("colour_term") for r in rows]
    return bool(terms) and all(ex._finite(t) not in (None, 0.0) for t in terms)


# ---------------------------------------------------------------------------- tail


def _table(rows: list[dict], revised: set[int] = frozenset()) -> str:
    head = (f"{'frame':>5} {'UT':>8} {'mjd':>12} {'mag':>8} {'err':>6} {'diff':>8} "
            f"{'err':>6} {'fwhm_as':>7} {'flags':>5}")
    lines = [head]

    def num(v, fmt):
        return format(v, fmt) if ex._finite(v) is not None else "-"

    for r in rows:
        mjd = ex._finite(r.get("mjd"))
        ut = time.strftime("%H:%M:%S", time.gmtime((mjd - 40587.0) * 86400.0)) if mjd else "-"
        mark = "  revised" if int(r["frame_id"]) in revised else ""
        lines.append(f"{r.get('frame') or '':>5} {ut:>8} {num(r['mjd'], '12.5f')} "
                     f"{num(r['mag'], '8.3f')} {num(r['mag_err'], '6.3f')} "
                     f"{num(r['diff_mag'], '8.3f')} {num(r['diff_mag_err'], '6.3f')} "
                     f"{num(r['fwhm_arcsec'], '7.2f')} {r['flags'] or 0:>5}{mark}")
    return "\n".join(lines)


def _tail_text(store: Store, target: str, band: str | None, n: int,
               shown: dict[int, str]) -> tuple[str, int]:
    """The tail's text and its number of points.

    ``shown`` remembers the ensemble version each point had when first shown
    (frame id -> version): a point derived since with another ensemble (the
    daemon re-derives the whole curve when it revises the ensemble) is
    marked ``revised`` for as long as the tail runs.
    """
    rows = series_rows(store, target, band)
    by_band = _by_band(rows)
    out = [f"{target}: {len(rows)} points"
           + (f" in {len(by_band)} bands ({', '.join(by_band)})" if by_band else "")]
    waiting = waiting_for_log(store)
    if waiting:
        out.append(f"{waiting} frames wait for the observing log (waiting_log): they get "
                   "points once a log line covers them")
    for b, rs in by_band.items():
        versions = {r["ensemble_version"] for r in rs}
        for r in rs:
            shown.setdefault(int(r["frame_id"]), r["ensemble_version"])
        revised = {int(r["frame_id"]) for r in rs
                   if shown[int(r["frame_id"])] != r["ensemble_version"]}
        comps = ex.comparison_list(rs[-1])
        out.append("")
        out.append(f"== {target} {b}: {len(rs)} points, ensemble "
                   f"{', '.join(sorted(map(str, versions)))} of {len(comps)} stars")
        if revised:
            out.append(f"   {len(revised)} points revised by a new comparison ensemble since "
                       "the tail began (marked 'revised')")
        bad = [f for f in store.frames(states=NO_POINT_STATES, band=b) if f["target"] == target]
        if bad:
            out.append(f"   {len(bad)} frames without a point: "
                       + ", ".join(f"{f['frame_number']} {f['state']} ({f['reason']})"
                                   for f in bad))
        out.append(_table(rs[-n:], revised))
        key = "mag" if any(ex._finite(r.get("mag")) is not None for r in rs) else "diff_mag"
        out.append(ex.terminal_plot(rs, key=key, height=12 if len(by_band) == 1 else 6)
                   .rstrip("\n"))
    return "\n".join(out) + "\n", len(rows)


def tail(cfg: Config, target: str, *, band: str | None = None, follow: bool = False,
         n: int = 15) -> int:
    """Show the newest light-curve points, a table per band; with ``follow``, keep updating.

    Exit status: 0 with points, 1 with none yet (or frames waiting for the
    log that may hold the target), 2 for a target or band the store does not have.
    """
    shown: dict[int, str] = {}
    last = None
    while True:
        store = _open(cfg)
        if store is None:
            return 1
        with store:
            try:
                name, b = resolve_series(store, target, band)
            except UnknownSeries as exc:
                if not follow or exc.exit_code == 2:
                    print(exc, file=sys.stderr)
                    return exc.exit_code
                name, b, text, count = None, None, f"{exc}\n", 0
            if name is not None:
                text, count = _tail_text(store, name, b, n, shown)
        if text != last:
            last = text
            if follow:
                print("\033[2J\033[H", end="")
            print(text, end="")
            sys.stdout.flush()
        if not follow:
            return 0 if count else 1
        time.sleep(2.0)


# ---------------------------------------------------------------------------- export, plot


def _series(cfg: Config, target: str, band: str | None):
    """Open the store and resolve the series; prints why not and returns an exit code."""
    store = _open(cfg)
    if store is None:
        return None, None, None, 1
    try:
        name, b = resolve_series(store, target, band)
    except UnknownSeries as exc:
        store.close()
        print(exc, file=sys.stderr)
        return None, None, None, exc.exit_code
    return store, name, b, 0


def export(cfg: Config, target: str, *, band: str | None = None, fmt: str = "csv",
           output: str | None = None, observer_code: str | None = None) -> int:
    """Write a target's light curve as CSV (the contract columns), ECSV or AAVSO Extended."""
    code = observer_code or cfg.export.observer_code
    if fmt == "aavso" and not code:
        print("photd: --format aavso needs the AAVSO observer code: give --observer-code "
              "CODE or set export.observer_code in the configuration", file=sys.stderr)
        return 2
    store, name, band, status_code = _series(cfg, target, band)
    if store is None:
        return status_code
    with store:
        rows = series_rows(store, name, band)
        if not rows:
            print(f"photd: no light-curve points for {name}" + (f" in band {band}" if band
                  else "") + _waiting_note(store), file=sys.stderr)
            return 1
        checks: dict[str, ex.CheckStar] = {}
        no_check: dict[str, str] = {}
        if fmt != "csv":
            for b, rs in _by_band(rows).items():
                stars = series_stars(store, name, b, rs)
                check, why_not = choose_check_star(stars, rs, cfg)
                add_check_star(rs, stars, check)
                if check:
                    checks[b] = check
                else:
                    no_check[b] = why_not
        transformed = fmt == "aavso" and _transformed(store, rows)
    if fmt == "csv":
        text = ex.to_csv(rows)
    elif fmt == "ecsv":
        text = ex.to_ecsv(rows, meta={
            "target": name,
            "check_stars": {**{b: {"id": c.star_id, "chosen": c.reason}
                               for b, c in checks.items()},
                            **{b: {"id": None, "chosen": why} for b, why in no_check.items()}}})
    else:
        text = ex.to_aavso(rows, observer_code=code, software=f"photd {__version__}",
                           transformed=transformed, check_stars=checks, comments=[
                               f"photd target {name}: comparison = the photd ensemble per "
                               "band (ids in NOTES COMPS); KMAG = check star against the "
                               "same ensemble",
                               "photd TRANS=" + ("YES: colour terms applied" if transformed
                                                 else "NO: no transformation applied"),
                               *(f"photd check star {b}: {why} (KNAME na)"
                                 for b, why in no_check.items())])
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _waiting_note(store: Store) -> str:
    waiting = waiting_for_log(store)
    return f" ({waiting} frames wait for the observing log)" if waiting else ""


def plot(cfg: Config, target: str, *, band: str | None = None,
         output: str | None = None) -> int:
    """Plot a target's light curve per band against UT, with comparisons and conditions."""
    store, name, band, status_code = _series(cfg, target, band)
    if store is None:
        return status_code
    with store:
        rows = series_rows(store, name, band)
        if not rows:
            print(f"photd: no light-curve points for {name}" + _waiting_note(store),
                  file=sys.stderr)
            return 1
        by_band = _by_band(rows)
        comps, marks, zps = {}, [], {}
        for b, rs in by_band.items():
            comps[b] = comparison_curves(series_stars(store, name, b, rs), rs)
            marks += frame_marks(store, name, b)
            zps[b] = zero_points(store, rs)
        nights = sorted({f["night"] for f in store.frames() if f["target"] == name
                         and f["night"]})
    out = Path(output or f"{slug(name)}.png")
    title = f"{name}  (night {', '.join(nights)})" if nights else name
    ex.plot_lightcurve(by_band, comps, out, title=title, marks=marks, zero_points=zps)
    print(out)
    return 0
