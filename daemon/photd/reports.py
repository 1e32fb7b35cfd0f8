"""Reading commands: ``photd status``, ``tail``, ``export`` and ``plot``.

They open the store read-only, so they work while the daemon writes (WAL).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from photd.config import Config
from photd.obslog import slug
from photd.store import Store
from photd.workdir import pause_marker, store_path


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


def _rows(cfg: Config, target: str, band: str | None) -> list[dict] | None:
    store = _open(cfg)
    if store is None:
        return None
    with store:
        rows = store.lightcurve(target, band)
    for r in rows:
        r["frame"] = r.get("frame_number")  # the observer's frame number, not our row id
    return rows


def _table(rows: list[dict]) -> str:
    head = (f"{'band':<4} {'frame':>5} {'mjd':>12} {'mag':>8} {'err':>6} {'diff':>8} "
            f"{'err':>6} {'fwhm_as':>7} flags")
    lines = [head]
    for r in rows:
        def num(v, fmt):
            return format(v, fmt) if v is not None else "-"
        lines.append(f"{r['band']:<4} {r.get('frame_number') or '':>5} {num(r['mjd'], '12.5f')} "
                     f"{num(r['mag'], '8.3f')} {num(r['mag_err'], '6.3f')} "
                     f"{num(r['diff_mag'], '8.3f')} {num(r['diff_mag_err'], '6.3f')} "
                     f"{num(r['fwhm_arcsec'], '7.2f')} {r['flags'] or 0}")
    return "\n".join(lines)


def tail(cfg: Config, target: str, *, band: str | None = None, follow: bool = False,
         n: int = 15) -> int:
    """Show the newest light-curve points; with ``follow``, keep updating."""
    from photd.export import terminal_plot

    shown = None
    while True:
        rows = _rows(cfg, target, band)
        if rows is None:
            return 1
        key = [(r["frame_id"], r["diff_mag"]) for r in rows]
        if key != shown:
            shown = key
            if follow:
                print("\033[2J\033[H", end="")
            print(f"{target}: {len(rows)} points")
            print(_table(rows[-n:]))
            if rows:
                print(terminal_plot(rows))
            sys.stdout.flush()
        if not follow:
            return 0 if rows else 1
        time.sleep(2.0)


def export(cfg: Config, target: str, *, band: str | None = None, fmt: str = "csv",
           output: str | None = None) -> int:
    """Write a target's light curve as CSV (the contract columns), ECSV or AAVSO."""
    from photd import export as ex

    rows = _rows(cfg, target, band)
    if rows is None:
        return 1
    if not rows:
        print(f"photd: no light-curve points for {target!r}"
              + (f" in band {band}" if band else ""), file=sys.stderr)
        return 1
    text = {"csv": ex.to_csv, "ecsv": ex.to_ecsv, "aavso": ex.to_aavso}[fmt](rows)
    if output:
        Path(output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def plot(cfg: Config, target: str, *, band: str | None = None,
         output: str | None = None) -> int:
    """Plot a target's light curve per band, comparison stars beneath."""
    from photd import export as ex

    rows = _rows(cfg, target, band)
    if rows is None:
        return 1
    if not rows:
        print(f"photd: no light-curve points for {target!r}", file=sys.stderr)
        return 1
    out = Path(output or f"{slug(target)}.png")
    by_band: dict[str, list[dict]] = {}
    for r in rows:
        by_band.setdefault(r["band"], []).append(r)
    ex.plot_lightcurve(by_band, _comparison_curves(cfg, target, list(by_band)), out,
                       title=target)
    print(out)
    return 0


def _comparison_curves(cfg: Config, target: str, bands: list[str]) -> dict:
    """Each band's comparison stars against the rest of the ensemble, for the plot."""
    from photd.catalog import CatalogError, CatalogSource, CatalogUnavailable
    from photd.curves import derive, target_position

    store = _open(cfg)
    if store is None:
        return {}
    with store:
        radec = target_position(store, target)
        if radec is None:
            return {}
        source = CatalogSource(cfg.catalog, cfg.work_dir, local_file=cfg.paths.catalog or None)
        try:
            catalog = source.stars(*radec)
        except (CatalogError, CatalogUnavailable):
            return {}  # the plot still shows the target's curve
        curves = {}
        for band in bands:
            got = derive(store, catalog, target, band, cfg)
            if got is not None:
                curves[band] = got[1].curves
        return curves
