"""Light-curve output: CSV (the **contract**), ECSV, AAVSO Extended, PNG and a terminal plot.

Pure formatting of light-curve row dicts (the store's ``lightcurve`` rows, or
those of :func:`photd.lightcurve.derive_lightcurve`); only
:func:`plot_lightcurve` writes a file (atomically: a temporary name in the
same folder, then rename). What is read from the store to fill them (check
stars, comparison curves, rejected frames) is gathered by :mod:`photd.reports`.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import MaskedColumn, Table
from astropy.time import Time

from photd import __version__
from photd.atomic import atomic_write

# DESIGN.md **contract**: `photd export --format csv` columns, in this order.
CSV_COLUMNS = ("target", "band", "frame", "mjd", "bjd_tdb", "mag", "mag_err", "diff_mag",
               "diff_mag_err", "airmass", "fwhm_arcsec", "aperture_px", "flags")

# AAVSO Extended File Format v1.2: the data fields, in order.
AAVSO_FIELDS = ("NAME", "DATE", "MAG", "MERR", "FILT", "TRANS", "MTYPE", "CNAME", "CMAG",
                "KNAME", "KMAG", "AMASS", "GROUP", "CHART", "NOTES")
# photd bands -> AAVSO filter codes (Sloan g', r', i' are SG, SR, SI; Johnson-Cousins
# letters are their own codes).
AAVSO_FILTERS = {"g": "SG", "r": "SR", "i": "SI", "u": "SU", "z": "SZ",
                 **{b: b for b in ("U", "B", "V", "R", "I", "J", "H", "K")}}
# v1.2 field length limits (characters).
AAVSO_LIMITS = {"NAME": 30, "DATE": 16, "MAG": 8, "MERR": 6, "CNAME": 20, "CMAG": 8,
                "KNAME": 20, "KMAG": 8, "AMASS": 7, "GROUP": 5, "CHART": 20}
# Exposures of the three cameras taken together start within this (days): one GROUP.
_SIMULTANEOUS_D = 60.0 / 86400.0

_UNITS = {"mag": u.mag, "mag_err": u.mag, "diff_mag": u.mag, "diff_mag_err": u.mag,
          "fwhm_arcsec": u.arcsec, "aperture_px": u.pix, "check_mag": u.mag}
_INT_COLUMNS = ("frame", "flags", "n_comparisons")
_STR_COLUMNS = ("target", "band", "ensemble_version", "check_star")
_FLOAT_FORMAT = {"mjd": "{:.6f}", "bjd_tdb": "{:.7f}", "mag": "{:.4f}", "mag_err": "{:.4f}",
                 "diff_mag": "{:.4f}", "diff_mag_err": "{:.4f}", "airmass": "{:.4f}",
                 "fwhm_arcsec": "{:.3f}", "aperture_px": "{:.3f}"}


def _fmt(key: str, value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float | np.floating):
        if not math.isfinite(float(value)):
            return ""
        return _FLOAT_FORMAT.get(key, "{:.6g}").format(float(value))
    return str(value)


def _finite(value: object) -> float | None:
    """``value`` as a float, or None when missing or not finite."""
    if value is None:
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def comparison_list(row: Mapping) -> list[str]:
    """A row's comparison stars: the store's ``comparison`` list, or the
    ``comparison_ids`` text (``"a;b;c"``) of :func:`photd.lightcurve.derive_lightcurve`."""
    value = row.get("comparison")
    if value is None:
        value = row.get("comparison_ids")
    if value is None:
        return []
    if isinstance(value, str):
        return [c for c in value.split(";") if c]
    return [str(c) for c in value]


def to_csv(rows: Iterable[Mapping]) -> str:
    """The contract CSV: a header line, then one line per light-curve row.

    Unknown values (NaN, None) are empty fields.
    """
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([_fmt(c, row.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def ecsv_table(rows: Sequence[Mapping], *, meta: Mapping | None = None) -> Table:
    """The light curve as an astropy table: contract columns first, then the rest.

    ``mjd`` (UTC) and ``bjd_tdb`` (TDB) are :class:`~astropy.time.Time`
    columns; magnitudes, FWHM and aperture carry units; frame numbers and
    flags are integers (masked where unknown); the comparison stars are one
    ``;``-separated string per row.
    """
    rows = list(rows)
    table = Table()
    mjd = np.array([_finite(r.get("mjd")) or np.nan for r in rows], float)
    bjd = np.array([_finite(r.get("bjd_tdb")) or np.nan for r in rows], float)
    table["target"] = np.array([str(r.get("target") or "") for r in rows], dtype=str)
    table["band"] = np.array([str(r.get("band") or "") for r in rows], dtype=str)
    table["frame"] = _int_column([r.get("frame") for r in rows])
    table["mjd"] = Time(mjd, format="mjd", scale="utc")
    table["bjd_tdb"] = Time(bjd, format="jd", scale="tdb")
    for col in CSV_COLUMNS[5:]:
        if col == "flags":
            table[col] = _int_column([r.get(col) for r in rows])
        else:
            table[col] = np.array([_finite(r.get(col)) if _finite(r.get(col)) is not None
                                   else np.nan for r in rows], float)
    table["ensemble_version"] = np.array([str(r.get("ensemble_version") or "") for r in rows],
                                         dtype=str)
    table["comparison"] = np.array([";".join(comparison_list(r)) for r in rows], dtype=str)
    if any("check_star" in r for r in rows):
        table["check_star"] = np.array([str(r.get("check_star") or "") for r in rows],
                                       dtype=str)
        table["check_mag"] = np.array([_finite(r.get("check_mag")) or np.nan for r in rows],
                                      float)
    for col, unit in _UNITS.items():
        if col in table.colnames:
            table[col].unit = unit
    table["mjd"].info.description = "mid-exposure, UTC"
    table["bjd_tdb"].info.description = "mid-exposure barycentric Julian date, TDB"
    table["diff_mag"].info.description = "target minus the comparison ensemble"
    table["flags"].info.description = "bits: see photd README, 'Flags'"
    if "check_mag" in table.colnames:
        table["check_mag"].info.description = "check star measured like the target"
    table.meta.update({
        "description": "photd light curve: differential aperture photometry",
        "software": f"photd {__version__}",
    })
    if meta:
        table.meta.update(dict(meta))
    return table


def _int_column(values: Sequence[object]) -> MaskedColumn:
    data = np.array([int(v) if _finite(v) is not None else 0 for v in values], np.int64)
    return MaskedColumn(data, mask=[_finite(v) is None for v in values], dtype=np.int64)


def to_ecsv(rows: Sequence[Mapping], *, meta: Mapping | None = None) -> str:
    """ECSV text of :func:`ecsv_table`; ``Table.read(text, format="ascii.ecsv")``
    gives back the times, units and integer columns."""
    buf = io.StringIO()
    ecsv_table(rows, meta=meta).write(buf, format="ascii.ecsv")
    return buf.getvalue()


# ---------------------------------------------------------------------------- AAVSO


@dataclass(frozen=True)
class CheckStar:
    """The check star of one band's curve and how it was chosen (for the report)."""

    star_id: str
    reason: str


def aavso_groups(rows: Sequence[Mapping]) -> list[str]:
    """The AAVSO GROUP of each row: the observer's frame number when the
    exposure has rows in more than one band (the three cameras expose
    together), else ``na``."""
    by_frame: dict[object, list[int]] = {}
    for k, row in enumerate(rows):
        if row.get("frame") is not None and _finite(row.get("mjd")) is not None:
            by_frame.setdefault(int(row["frame"]), []).append(k)
    groups = ["na"] * len(rows)
    for frame, idx in by_frame.items():
        bands = {rows[k].get("band") for k in idx}
        times = [float(rows[k]["mjd"]) for k in idx]
        if len(bands) > 1 and max(times) - min(times) < _SIMULTANEOUS_D:
            for k in idx:
                groups[k] = str(frame % 100000)  # GROUP: an integer of at most 5 characters
    return groups


def to_aavso(rows: Sequence[Mapping], *, observer_code: str,
             software: str = f"photd {__version__}", chart: str = "na",
             star_name: str | None = None, delim: str = ",", transformed: bool = False,
             check_stars: Mapping[str, CheckStar] | None = None,
             comments: Sequence[str] = ()) -> str:
    """AAVSO Extended File Format (v1.2) report of the light curve.

    Parameters
    ----------
    rows : sequence of dict
        Light-curve rows (``mjd``, ``mag``, ``mag_err``, ``band``, ``frame``,
        ``airmass``, ``comparison``, ``ensemble_version``, ``target``, and for
        a check star ``check_mag``, ``check_mag_inst``, ``mag_inst``).
    observer_code : str
        The observer's AAVSO code (``#OBSCODE``).
    software : str
        ``#SOFTWARE``: name and version.
    chart : str
        AAVSO sequence id of the comparison stars, ``na`` (the default) when
        they come from photd's own catalog, as the spec asks.
    star_name : str, optional
        AAVSO name of the star (default: the row's target).
    delim : str
        Field delimiter: one printable ASCII character, not ``|``, ``#`` or space.
    transformed : bool
        ``TRANS=YES`` only when a transformation to the standard system was
        applied to these magnitudes.
    check_stars : dict, optional
        Band -> the check star of that band's rows (``KNAME``; ``KMAG`` is the
        row's ``check_mag``).
    comments : sequence of str
        Extra ``#`` comment lines after the parameters (kept by the AAVSO archive).

    Notes
    -----
    ``MTYPE=STD``: magnitudes are the ensemble's, tied to the catalog
    magnitudes of its stars. The comparison is the ensemble (``CNAME=ENSEMBLE``,
    ``CMAG=na``), its stars listed in NOTES; ``KMAG`` is the check star
    measured against the same ensemble on the same frame. ``DATE`` is the
    mid-exposure JD (UTC). Rows without a magnitude are left out. Unknown
    values are ``na``.
    """
    if len(delim) != 1 or not 32 <= ord(delim) <= 126 or delim in "|# ":
        raise ValueError(f"delim {delim!r}: one printable ASCII character other than "
                         "'|', '#' and space")
    code = str(observer_code or "").strip()
    if not code or any(ch in code for ch in f"{delim}# |"):
        raise ValueError(f"observer code {observer_code!r}: give the AAVSO observer code")
    check_stars = check_stars or {}
    lines = ["#TYPE=EXTENDED", f"#OBSCODE={code}", f"#SOFTWARE={software[:255]}",
             f"#DELIM={delim}", "#DATE=JD", "#OBSTYPE=CCD"]
    lines += [f"#{c}" for c in comments]
    for band, check in check_stars.items():  # in the caller's band order
        lines.append(f"#photd check star {band}: {check.star_id} ({check.reason})")
    lines.append("#" + delim.join(AAVSO_FIELDS))

    def clean(text: object, limit: int | None = None) -> str:
        text = " ".join(str(text).replace(delim, " ").split())
        text = text[:limit] if limit else text
        return text or "na"

    def num(value: object, fmt: str, limit: int) -> str:
        v = _finite(value)
        if v is None:
            return "na"
        text = fmt.format(v)
        return text if len(text) <= limit else "na"

    rows = [r for r in rows if _finite(r.get("mag")) is not None and
            _finite(r.get("mjd")) is not None]
    groups = aavso_groups(rows)
    for row, group in zip(rows, groups, strict=True):
        band = str(row.get("band", ""))
        if band not in AAVSO_FILTERS:
            raise ValueError(f"band {band!r} has no AAVSO filter code "
                             f"(known: {', '.join(AAVSO_FILTERS)})")
        comps = comparison_list(row)
        notes = [f"photd ensemble of {len(comps)} comparison stars"]
        notes.append(f"COMPS={' '.join(comps) or 'none'}")
        notes.append(f"ENSVER={row.get('ensemble_version') or 'na'}")
        if row.get("frame") is not None:
            notes.append(f"FRAME={row['frame']}")
        for key, name in (("mag_inst", "VMAGINS"), ("check_mag_inst", "KMAGINS")):
            if _finite(row.get(key)) is not None:
                notes.append(f"{name}={float(row[key]):.4f}")
        if _finite(row.get("airmass")) is not None:
            notes.append(f"VX={float(row['airmass']):.4f}")
        if row.get("flags"):
            notes.append(f"FLAGS={int(row['flags'])}")
        check = check_stars.get(band)
        kmag = num(row.get("check_mag"), "{:.3f}", AAVSO_LIMITS["KMAG"]) if check else "na"
        fields = [
            clean(star_name or row.get("target", ""), AAVSO_LIMITS["NAME"]),
            f"{float(row['mjd']) + 2400000.5:.6f}",
            f"{float(row['mag']):.3f}",
            num(row.get("mag_err"), "{:.3f}", AAVSO_LIMITS["MERR"]),
            AAVSO_FILTERS[band],
            "YES" if transformed else "NO",
            "STD",
            "ENSEMBLE", "na",
            clean(check.star_id, AAVSO_LIMITS["KNAME"]) if check and kmag != "na" else "na",
            kmag,
            num(row.get("airmass"), "{:.4f}", AAVSO_LIMITS["AMASS"]),
            group,
            clean(chart, AAVSO_LIMITS["CHART"]),
            clean("|".join(notes)),
        ]
        lines.append(delim.join(fields))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class FrameMark:
    """A frame of the series that has no light-curve point: its time, band and why."""

    mjd: float
    band: str
    state: str
    reason: str
    frame: int | None = None


_COLOURS = {"g": "tab:green", "r": "tab:red", "i": "tab:purple"}


def _ut_hours(mjd: np.ndarray, day0: float) -> np.ndarray:
    return (np.asarray(mjd, float) - day0) * 24.0


def plot_lightcurve(rows_by_band: Mapping[str, Sequence[Mapping]],
                    comparison_curves: Mapping[str, Mapping[str, Sequence[tuple]]],
                    path: str | Path, *, title: str = "",
                    marks: Sequence[FrameMark] = (),
                    zero_points: Mapping[str, Sequence[tuple[float, float, float]]] | None = None,
                    ) -> Path:
    """A PNG of a night's light curve against UT: one panel per band, the
    comparison stars beside it, airmass, FWHM and zero point beneath.

    Parameters
    ----------
    rows_by_band : dict
        Band -> light-curve rows (``mjd``, ``mag`` or ``diff_mag``, errors,
        ``airmass``, ``fwhm_arcsec``, ``flags``).
    comparison_curves : dict
        Band -> (star id -> [(mjd, delta_mag, err), ...]): each comparison
        against the rest of the ensemble, mean removed.
    path : path
        Output PNG; written to a temporary name in the same folder, then renamed.
    title : str
        First line of the title; the UT date of the axis is added.
    marks : sequence of FrameMark
        Frames without a point (badfit, rejected, failed), drawn as red
        crosses with their reason on the band's panel.
    zero_points : dict, optional
        Band -> [(mjd, zp, zp_err), ...] for the zero-point panel.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on the daemon's host
    import matplotlib.pyplot as plt

    path = Path(path)
    zero_points = zero_points or {}
    bands = [b for b in ("g", "r", "i") if rows_by_band.get(b)]
    bands += [b for b in rows_by_band if rows_by_band[b] and b not in bands]
    bands = bands or list(rows_by_band)[:1] or ["r"]
    all_mjd = [float(r["mjd"]) for b in bands for r in rows_by_band.get(b, ())
               if _finite(r.get("mjd")) is not None] + [m.mjd for m in marks]
    day0 = math.floor(min(all_mjd)) if all_mjd else 0.0
    utdate = Time(day0, format="mjd").to_value("iso", subfmt="date") if all_mjd else "?"

    n_rows = len(bands) + 2
    fig, axes = plt.subplots(n_rows, 2, figsize=(13, 2.3 * n_rows + 0.8), sharex=True,
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2]})
    for k, band in enumerate(bands):
        _plot_band(axes[k, 0], band, rows_by_band.get(band, ()), day0,
                   [m for m in marks if m.band == band])
        _plot_comparisons(axes[k, 1], band, comparison_curves.get(band, {}), day0)
    ax_am, ax_fw = axes[len(bands), 0], axes[len(bands) + 1, 0]
    ax_zp, ax_frames = axes[len(bands), 1], axes[len(bands) + 1, 1]
    for band in bands:
        rows = [r for r in rows_by_band.get(band, ()) if _finite(r.get("mjd")) is not None]
        t = _ut_hours([float(r["mjd"]) for r in rows], day0)
        colour = _COLOURS.get(band, "k")
        am = [_finite(r.get("airmass")) for r in rows]
        fw = [_finite(r.get("fwhm_arcsec")) for r in rows]
        ax_am.plot(t, [np.nan if v is None else v for v in am], "o-", ms=3, lw=0.8,
                   color=colour, label=band)
        ax_fw.plot(t, [np.nan if v is None else v for v in fw], "o-", ms=3, lw=0.8,
                   color=colour, label=band)
        zp = [z for z in zero_points.get(band, ()) if _finite(z[1]) is not None]
        if zp:
            ax_zp.errorbar(_ut_hours([z[0] for z in zp], day0), [z[1] for z in zp],
                           yerr=[_finite(z[2]) or 0.0 for z in zp], fmt="o-", ms=3, lw=0.8,
                           capsize=2, color=colour, label=band)
    ax_am.set_ylabel("airmass")
    ax_am.invert_yaxis()  # low airmass (good) up, like bright magnitudes
    ax_fw.set_ylabel('FWHM (")')
    ax_zp.set_ylabel("zero point (mag)")
    if not zero_points:
        ax_zp.text(0.5, 0.5, "no zero points stored", transform=ax_zp.transAxes,
                   ha="center", va="center", color="0.5")
    _plot_frames(ax_frames, bands, rows_by_band, marks, day0)
    for ax in (ax_am, ax_fw, ax_zp):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=7, ncol=3)
    for ax in axes[-1, :]:
        ax.set_xlabel(f"UT on {utdate} (hours)")
        ax.tick_params(labelbottom=True)
    fig.suptitle(f"{title}  —  UT {utdate}" if title else f"UT {utdate}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    finally:
        plt.close(fig)
    return path


def _plot_band(ax, band: str, rows: Sequence[Mapping], day0: float,
               marks: Sequence[FrameMark]) -> None:
    colour = _COLOURS.get(band, "k")
    use_mag = any(_finite(r.get("mag")) is not None for r in rows)
    key, ekey = ("mag", "mag_err") if use_mag else ("diff_mag", "diff_mag_err")
    pts = [r for r in rows if _finite(r.get(key)) is not None and
           _finite(r.get("mjd")) is not None]
    if pts:
        t = _ut_hours([float(r["mjd"]) for r in pts], day0)
        m = np.array([float(r[key]) for r in pts])
        e = np.array([_finite(r.get(ekey)) or 0.0 for r in pts])
        flagged = np.array([bool(r.get("flags")) for r in pts])
        median_err = float(np.median(e)) if len(e) else math.nan
        # Thin markers with caps: a 3 mmag error bar is still visible on a 0.3 mag axis.
        ax.errorbar(t[~flagged], m[~flagged], yerr=e[~flagged], fmt="o", ms=3.5,
                    color=colour, ecolor=colour, elinewidth=1.2, capsize=3,
                    label=f"{pts[0].get('target', '')} {band}  ({len(pts)} points, "
                          f"median err {median_err * 1000:.0f} mmag)")
        if flagged.any():
            ax.errorbar(t[flagged], m[flagged], yerr=e[flagged], fmt="o", ms=5,
                        mfc="white", color=colour, elinewidth=1.2, capsize=3,
                        label="flagged (see flags)")
        lo, hi = float(np.min(m - e)), float(np.max(m + e))
        pad = max(0.02, 0.08 * (hi - lo))
        ax.set_ylim(hi + pad, lo - pad)  # bright up
    else:
        ax.invert_yaxis()
        ax.text(0.5, 0.5, "no points", transform=ax.transAxes, ha="center", color="0.5")
    for mk in marks:
        x = _ut_hours([mk.mjd], day0)[0]
        ax.axvline(x, color="tab:red", lw=0.8, ls=":", alpha=0.8)
        ax.annotate(f"{mk.state}: {mk.reason}", (x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(2, -10), textcoords="offset points", fontsize=7,
                    color="tab:red", rotation=0)
    if marks:
        ax.plot([], [], ls=":", color="tab:red", label="frame without a point")
    ax.set_ylabel(f"{band} ({'mag' if use_mag else 'diff. mag'})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, framealpha=0.6)  # "best": never over a point


def _plot_comparisons(ax, band: str, curves: Mapping[str, Sequence[tuple]],
                      day0: float) -> None:
    if not curves:
        ax.text(0.5, 0.5, f"{band}: no comparison curves", transform=ax.transAxes,
                ha="center", va="center", color="0.5")
        ax.set_yticks([])
        return
    # Stacked curves 4 typical scatters apart (at least 0.03 mag) so they do not overlap.
    rms_all = [float(np.sqrt(np.mean(np.square([c[1] for c in cv])))) for cv in curves.values()
               if cv]
    step = max(0.03, round(4 * float(np.median(rms_all)), 2)) if rms_all else 0.03
    for k, (sid, curve) in enumerate(sorted(curves.items())):
        if not curve:
            continue
        t = _ut_hours([c[0] for c in curve], day0)
        d = np.array([c[1] for c in curve], float)
        e = np.array([c[2] for c in curve], float)
        ax.errorbar(t, d + k * step, yerr=e, fmt=".", ms=3, lw=0.6, capsize=1.5,
                    color="0.35")
        rms = float(np.sqrt(np.nanmean(d ** 2))) if len(d) else math.nan
        ax.annotate(f"{sid} rms {rms * 1000:.0f} mmag", (1.0, k * step),
                    xycoords=("axes fraction", "data"), xytext=(3, 0),
                    textcoords="offset points", fontsize=6, color="0.3", va="center")
    lo = min((c[1] - c[2] for cv in curves.values() for c in cv), default=0.0)
    ax.set_ylim((len(curves) - 1) * step + step, min(-step, lo - 0.2 * step))
    ax.set_ylabel(f"{band} comparisons\n(star − others, +{step:.2f} each)", fontsize=8)
    ax.grid(alpha=0.3)


def _plot_frames(ax, bands: Sequence[str], rows_by_band: Mapping[str, Sequence[Mapping]],
                 marks: Sequence[FrameMark], day0: float) -> None:
    """One line per band: a dot per point, a red cross per frame without one."""
    for k, band in enumerate(bands):
        t = _ut_hours([float(r["mjd"]) for r in rows_by_band.get(band, ())
                       if _finite(r.get("mjd")) is not None], day0)
        ax.plot(t, np.full(len(t), k), "o", ms=4, color=_COLOURS.get(band, "k"))
        bad = [m for m in marks if m.band == band]
        if bad:
            ax.plot(_ut_hours([m.mjd for m in bad], day0), np.full(len(bad), k), "x",
                    ms=7, mew=2, color="tab:red")
    ax.set_yticks(range(len(bands)), bands)
    ax.set_ylim(len(bands) - 0.5, -0.5)
    ax.set_ylabel("frames\n(x: no point)", fontsize=8)
    ax.grid(alpha=0.3)


def terminal_plot(rows: Sequence[Mapping], width: int = 60, height: int = 12,
                  key: str = "mag") -> str:
    """A small text plot of mag against time (bright up), for ``photd tail``."""
    pts = [(float(r["mjd"]), float(r[key])) for r in rows
           if _finite(r.get(key)) is not None and _finite(r.get("mjd")) is not None]
    if not pts:
        return "(no measurements yet)\n"
    t = np.array([p[0] for p in pts])
    m = np.array([p[1] for p in pts])
    t0, t1 = float(t.min()), float(t.max())
    m0, m1 = float(m.min()), float(m.max())
    if m1 - m0 < 1e-3:
        m0, m1 = m0 - 0.01, m1 + 0.01
    grid = [[" "] * width for _ in range(height)]
    for ti, mi in zip(t, m, strict=True):
        col = int(round((ti - t0) / (t1 - t0) * (width - 1))) if t1 > t0 else width // 2
        row = int(round((mi - m0) / (m1 - m0) * (height - 1)))  # bright (small mag) at top
        grid[row][col] = "*"
    label_w = 8
    out = []
    for k, line in enumerate(grid):
        label = f"{m0:.3f}" if k == 0 else (f"{m1:.3f}" if k == height - 1 else "")
        out.append(f"{label:>{label_w}} |" + "".join(line))
    out.append(" " * label_w + " +" + "-" * width)
    ut0 = Time(t0, format="mjd").to_value("iso", subfmt="date_hm")
    span_h = (t1 - t0) * 24
    out.append(" " * label_w + f"  UT {ut0} .. +{span_h:.2f} h   ({len(pts)} points)")
    return "\n".join(out) + "\n"
