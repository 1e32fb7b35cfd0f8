"""Light-curve output: CSV (the **contract**), ECSV, AAVSO Extended, PNG and a terminal plot.

Pure formatting of the row dicts made by
:func:`photd.lightcurve.derive_lightcurve`; only :func:`plot_lightcurve`
writes a file (atomically: a temporary name in the same folder, then rename).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from astropy.table import Table

from photd.atomic import atomic_write

# DESIGN.md **contract**: `photd export --format csv` columns, in this order.
CSV_COLUMNS = ("target", "band", "frame", "mjd", "bjd_tdb", "mag", "mag_err", "diff_mag",
               "diff_mag_err", "airmass", "fwhm_arcsec", "aperture_px", "flags")

# AAVSO Extended File Format v1.2: the data fields, in order.
AAVSO_FIELDS = ("NAME", "DATE", "MAG", "MERR", "FILT", "TRANS", "MTYPE", "CNAME", "CMAG",
                "KNAME", "KMAG", "AMASS", "GROUP", "CHART", "NOTES")
AAVSO_FILTERS = {"g": "SG", "r": "SR", "i": "SI"}  # Sloan g', r', i'

_UNITS = {"mjd": "d", "bjd_tdb": "d", "mag": "mag", "mag_err": "mag", "diff_mag": "mag",
          "diff_mag_err": "mag", "fwhm_arcsec": "arcsec", "aperture_px": "pix"}
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


def to_ecsv(rows: Sequence[Mapping], *, meta: Mapping | None = None) -> str:
    """ECSV text with units and metadata (contract columns first, then the rest)."""
    rows = list(rows)
    extra = [k for k in (rows[0] if rows else {}) if k not in CSV_COLUMNS]
    table = Table()
    for col in (*CSV_COLUMNS, *extra):
        vals = [r.get(col) for r in rows]
        if col in ("target", "band", "ensemble_version", "comparison_ids"):
            table[col] = np.array([str(v) if v is not None else "" for v in vals], dtype=str)
        elif col in ("frame", "flags", "n_comparisons"):
            table[col] = np.array([int(v) if v is not None else 0 for v in vals], dtype=np.int64)
        else:
            table[col] = np.array([np.nan if v is None else float(v) for v in vals], dtype=float)
        if col in _UNITS:
            table[col].unit = _UNITS[col]
    table.meta.update({
        "description": "photd light curve: differential aperture photometry",
        "time_scales": {"mjd": "UTC, mid-exposure", "bjd_tdb": "TDB, barycentric JD"},
        "diff_mag": "target minus comparison ensemble, colour-corrected",
    })
    if meta:
        table.meta.update(dict(meta))
    buf = io.StringIO()
    table.write(buf, format="ascii.ecsv")
    return buf.getvalue()


def to_aavso(rows: Iterable[Mapping], *, observer_code: str, software: str = "photd",
             date_type: str = "JD", chart: str = "na", star_name: str | None = None,
             delim: str = ",") -> str:
    """AAVSO Extended File Format (v1.2) report of the light curve.

    Parameters
    ----------
    rows : iterable of dict
        Light-curve rows (``mjd``, ``bjd_tdb``, ``mag``, ``mag_err``, ``band``,
        ``airmass``, ``comparison_ids``, ``ensemble_version``, ``target``).
    observer_code : str
        The observer's AAVSO code (``#OBSCODE``).
    software : str
        ``#SOFTWARE`` text.
    date_type : {"JD", "BJD"}
        ``JD``: mid-exposure UTC Julian date (the spec's preferred form).
        ``BJD``: BJD_TDB (not in the v1.2 list of JD/HJD/EXCEL; only where
        the AAVSO accepts it).
    chart : str
        AAVSO chart id of the comparison sequence, ``na`` when none.
    star_name : str, optional
        AAVSO name of the star (default: the row's target).
    delim : str
        Field delimiter; must not occur in any field.

    Notes
    -----
    Magnitudes are ensemble magnitudes calibrated to the catalog (Sloan
    g, r, i: filters SG, SR, SI) with a colour term, so ``TRANS=YES`` and
    ``MTYPE=STD``; the comparison is the ensemble: ``CNAME=ENSEMBLE``,
    ``CMAG=na``, no check star (``KNAME=na``). Unknown values are ``na``.
    """
    if date_type.upper() not in ("JD", "BJD"):
        raise ValueError(f"date_type {date_type!r}: expected 'JD' or 'BJD'")
    if len(delim) != 1 or delim in "#":
        raise ValueError(f"delim {delim!r}: a single character other than '#'")
    lines = ["#TYPE=EXTENDED", f"#OBSCODE={observer_code}", f"#SOFTWARE={software}",
             f"#DELIM={delim}", f"#DATE={date_type.upper()}", "#OBSTYPE=CCD",
             "#" + delim.join(AAVSO_FIELDS)]

    def clean(text: str, limit: int) -> str:
        text = str(text).replace(delim, " ").replace("\n", " ").strip()
        return text[:limit] if text else "na"

    for row in rows:
        mag = row.get("mag")
        if mag is None or not math.isfinite(float(mag)):
            continue  # a row with no magnitude is not an observation
        if date_type.upper() == "JD":
            date = float(row["mjd"]) + 2400000.5
        else:
            date = float(row["bjd_tdb"])
        err = row.get("mag_err")
        am = row.get("airmass")
        notes = f"ENSEMBLE={str(row.get('comparison_ids', '')).replace(delim, ' ')}" \
            f"|VERSION={row.get('ensemble_version', '')}|FRAME={row.get('frame', '')}"
        if row.get("flags"):
            notes += f"|FLAGS={int(row['flags'])}"
        fields = [
            clean(star_name or row.get("target", ""), 30),
            f"{date:.5f}",
            f"{float(mag):.3f}",
            f"{float(err):.3f}" if err is not None and math.isfinite(float(err)) else "na",
            AAVSO_FILTERS.get(str(row.get("band", "")), "na"),
            "YES", "STD", "ENSEMBLE", "na", "na", "na",
            f"{float(am):.3f}" if am is not None and math.isfinite(float(am)) else "na",
            "na", clean(chart, 20), clean(notes.replace(delim, " "), 2000),
        ]
        lines.append(delim.join(fields))
    return "\n".join(lines) + "\n"


def plot_lightcurve(rows_by_band: Mapping[str, Sequence[Mapping]],
                    comparison_curves: Mapping[str, Mapping[str, Sequence[tuple]]],
                    path: str | Path, *, title: str = "") -> Path:
    """A PNG of the light curve per band, comparison stars beneath (paper Fig. 5).

    Parameters
    ----------
    rows_by_band : dict
        Band -> light-curve rows.
    comparison_curves : dict
        Band -> (star id -> [(mjd, delta_mag, err), ...]), as in
        :attr:`photd.lightcurve.EnsembleInfo.curves`.
    path : path
        Output PNG; written to a temporary name in the same folder, then renamed.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on the daemon's host
    import matplotlib.pyplot as plt

    path = Path(path)
    bands = [b for b in ("g", "r", "i") if rows_by_band.get(b)] or list(rows_by_band)
    fig, axes = plt.subplots(len(bands) or 1, 1, figsize=(8, 2.8 * max(len(bands), 1)),
                             sharex=True, squeeze=False)
    colours = {"g": "tab:green", "r": "tab:red", "i": "tab:purple"}
    for ax, band in zip(axes[:, 0], bands, strict=False):
        rows = [r for r in rows_by_band[band] if r.get("mag") is not None
                and math.isfinite(float(r["mag"]))]
        if not rows:
            continue
        t = np.array([float(r["mjd"]) for r in rows])
        m = np.array([float(r["mag"]) for r in rows])
        e = np.array([float(r["mag_err"]) for r in rows])
        ax.errorbar(t, m, yerr=e, fmt="o", ms=3, color=colours.get(band, "k"),
                    label=f"{rows[0].get('target', '')} {band}")
        # Comparisons beneath the target, offset so they do not overlap it.
        base = float(np.nanmax(m + e)) + 0.1
        for k, (sid, curve) in enumerate(sorted(comparison_curves.get(band, {}).items())):
            if not curve:
                continue
            ct = np.array([c[0] for c in curve])
            cm = np.array([c[1] for c in curve]) + base + 0.1 * k
            ce = np.array([c[2] for c in curve])
            ax.errorbar(ct, cm, yerr=ce, fmt=".", ms=2, color="0.5", lw=0.5)
            ax.annotate(sid, (ct[-1], cm[-1]), fontsize=6, color="0.4",
                        xytext=(3, 0), textcoords="offset points")
        ax.invert_yaxis()
        ax.set_ylabel(f"{band} (mag)")
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("MJD (UTC, mid-exposure)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def terminal_plot(rows: Sequence[Mapping], width: int = 60, height: int = 12) -> str:
    """A small text plot of mag against time (bright up), for ``photd tail``."""
    pts = [(float(r["mjd"]), float(r["mag"])) for r in rows
           if r.get("mag") is not None and math.isfinite(float(r["mag"]))
           and r.get("mjd") is not None and math.isfinite(float(r["mjd"]))]
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
    span_h = (t1 - t0) * 24
    out.append(" " * label_w + f"  MJD {t0:.4f} .. +{span_h:.2f} h   ({len(pts)} points)")
    return "\n".join(out) + "\n"
