"""A checker of the AAVSO Extended File Format v1.2, written from the published
specification (aavso.org "AAVSO Extended File Format"), not from photd's writer.

:func:`validate_aavso` returns the list of problems of a report (empty: valid)
and the parsed records, so tests can also look at the values.
"""

from __future__ import annotations

import re

# The six parameters the spec requires at the top of the file.
REQUIRED_PARAMETERS = ("TYPE", "OBSCODE", "SOFTWARE", "DELIM", "DATE", "OBSTYPE")
DATE_TYPES = ("JD", "HJD", "EXCEL")
OBS_TYPES = ("CCD", "DSLR", "PEP")
# The data fields, in order.
FIELDS = ("STARID", "DATE", "MAGNITUDE", "MAGERR", "FILTER", "TRANS", "MTYPE", "CNAME",
          "CMAG", "KNAME", "KMAG", "AIRMASS", "GROUP", "CHART", "NOTES")
# Filter codes the spec lists.
FILTERS = {"U", "B", "V", "R", "I", "J", "H", "K", "TG", "TB", "TR", "CV", "CR", "SZ", "SU",
           "SG", "SR", "SI", "STU", "STV", "STB", "STY", "STHBW", "STHBN", "MA", "MB", "MI",
           "ZS", "Y", "HA", "HAC", "O"}
MTYPES = ("STD", "DIF", "ABS")
# Field length limits (characters); NOTES has "several thousand".
LIMITS = {"STARID": 30, "DATE": 16, "MAGNITUDE": 8, "MAGERR": 6, "CNAME": 20, "CMAG": 8,
          "KNAME": 20, "KMAG": 8, "AIRMASS": 7, "GROUP": 5, "CHART": 20, "NOTES": 4000}
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def _is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text))


def validate_aavso(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """Check a report against the spec: ``(problems, records)``."""
    problems: list[str] = []
    records: list[dict[str, str]] = []
    params: dict[str, str] = {}
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    in_data = False
    for n, line in enumerate(lines, 1):
        if line.strip() == "":
            problems.append(f"line {n}: blank line (WebObs refuses them unless commented out)")
            continue
        if line.startswith("#"):
            if in_data and line[1:].split("=", 1)[0].upper() not in ("OBSCODE", "DATE"):
                continue  # a comment among the data
            key, eq, value = line[1:].partition("=")
            if eq and key.upper() in REQUIRED_PARAMETERS:
                params[key.upper()] = value
            continue
        in_data = True
        missing = [p for p in REQUIRED_PARAMETERS if p not in params]
        if missing:
            problems.append(f"line {n}: data before the parameters {', '.join(missing)}")
            break
        delim = {"tab": "\t", "comma": ","}.get(params["DELIM"].lower(), params["DELIM"])
        fields = line.split(delim)
        if len(fields) != len(FIELDS):
            problems.append(f"line {n}: {len(fields)} fields, the spec has {len(FIELDS)} "
                            f"(is the delimiter {delim!r} inside a field?)")
            continue
        rec = dict(zip(FIELDS, fields, strict=True))
        records.append(rec)
        problems += [f"line {n}: {p}" for p in _check_record(rec, params)]
    for p in REQUIRED_PARAMETERS:
        if p not in params:
            problems.append(f"parameter #{p}= missing")
    if params.get("TYPE", "").upper() != "EXTENDED":
        problems.append(f"#TYPE={params.get('TYPE')!r}: must be EXTENDED")
    if not params.get("OBSCODE", "").strip():
        problems.append("#OBSCODE= is empty")
    if not params.get("SOFTWARE", "").strip() or len(params.get("SOFTWARE", "")) > 255:
        problems.append("#SOFTWARE= must name the software (at most 255 characters)")
    delim = params.get("DELIM", "")
    if delim.lower() not in ("tab", "comma") and (len(delim) != 1 or not 32 <= ord(delim) <= 126
                                                  or delim in "|# "):
        problems.append(f"#DELIM={delim!r}: one ASCII character 32-126 other than | # space")
    if params.get("DATE", "").upper() not in DATE_TYPES:
        problems.append(f"#DATE={params.get('DATE')!r}: not one of {DATE_TYPES}")
    if params.get("OBSTYPE", "CCD").upper() not in OBS_TYPES:
        problems.append(f"#OBSTYPE={params.get('OBSTYPE')!r}: not one of {OBS_TYPES}")
    problems += _check_groups(records)
    return problems, records


def _check_record(rec: dict[str, str], params: dict[str, str]) -> list[str]:
    out = []
    for name, value in rec.items():
        if value == "":
            out.append(f"{name} is empty: unknown values must be 'na'")
        if name in LIMITS and len(value) > LIMITS[name]:
            out.append(f"{name} {value!r} longer than {LIMITS[name]} characters")
    if rec["STARID"] in ("", "na"):
        out.append("STARID missing")
    date = rec["DATE"]
    if params.get("DATE", "").upper() in ("JD", "HJD"):
        if not _is_number(date) or not 2_400_000 < float(date) < 2_500_000:
            out.append(f"DATE {date!r} is not a Julian date")
    mag = rec["MAGNITUDE"].lstrip("<")
    if not _is_number(mag) or "." not in mag:
        out.append(f"MAGNITUDE {rec['MAGNITUDE']!r}: a number with a dot")
    for name in ("MAGERR", "CMAG", "KMAG", "AIRMASS"):
        if rec[name] != "na" and not _is_number(rec[name]):
            out.append(f"{name} {rec[name]!r}: a number or 'na'")
    if rec["FILTER"].upper() not in FILTERS:
        out.append(f"FILTER {rec['FILTER']!r} is not an AAVSO filter code")
    if rec["TRANS"].upper() not in ("YES", "NO"):
        out.append(f"TRANS {rec['TRANS']!r}: YES or NO")
    if rec["MTYPE"].upper() not in MTYPES:
        out.append(f"MTYPE {rec['MTYPE']!r}: one of {MTYPES}")
    if rec["MTYPE"].upper() == "DIF" and rec["CNAME"] == "na":
        out.append("MTYPE DIF requires CNAME")
    if rec["CNAME"].upper() == "ENSEMBLE" and rec["CMAG"] != "na":
        out.append("CNAME ENSEMBLE takes CMAG na")
    if (rec["KNAME"] == "na") != (rec["KMAG"] == "na"):
        out.append("KNAME and KMAG: both given or both na")
    if rec["GROUP"] != "na" and not rec["GROUP"].isdigit():
        out.append(f"GROUP {rec['GROUP']!r}: an integer or 'na'")
    return out


def _check_groups(records: list[dict[str, str]]) -> list[str]:
    """One GROUP is one observation set through several filters, at one time."""
    groups: dict[tuple[str, str], list[dict[str, str]]] = {}
    for rec in records:
        if rec["GROUP"] != "na":
            groups.setdefault((rec["STARID"], rec["GROUP"]), []).append(rec)
    out = []
    for (star, group), recs in groups.items():
        filters = [r["FILTER"] for r in recs]
        if len(set(filters)) != len(filters):
            out.append(f"{star} GROUP {group}: filter repeated ({filters})")
        dates = [float(r["DATE"]) for r in recs if _is_number(r["DATE"])]
        if dates and max(dates) - min(dates) > 0.01:
            out.append(f"{star} GROUP {group}: dates {min(dates)}..{max(dates)} are not one set")
    return out
