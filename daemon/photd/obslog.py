"""The observing log (paper Table 1): which frames show what.

One line per run of frames::

    start,end,name,exposure,ra,dec
    96,114,OJ287,300,08:54:48,+20:06:30
    1,10,bias,1,,

``start`` and ``end`` are inclusive frame numbers, ``name`` a target or a
calibration kind (``bias``, ``dark``, ``flat``, ``sky flat``, ``dome flat``;
any case and spacing), ``exposure`` in seconds, ``ra`` in sexagesimal hours
(``08:54:48`` or ``08 54 48``; a plain number is degrees) and ``dec`` in
sexagesimal degrees (``+20:06:30``; a plain number is degrees). Both
coordinates may be empty.

The log is written by hand during the night, so the reader is forgiving
about form (CRLF, a UTF-8 BOM, GBK-encoded names, blank lines, ``#``
comments, trailing commas, spaces) and strict about meaning: a line that
cannot be trusted is reported as a :class:`LogProblem` naming the file, line
and field, and the other lines are still used.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import astropy.units as u
from astropy.coordinates import Angle, RangeError

from photd.config import ObslogConfig

__all__ = [
    "CALIBRATION_KINDS",
    "LogEntry",
    "LogProblem",
    "ObservingLog",
    "ObservingLogError",
    "find_logs",
    "looks_like_log",
    "merge_logs",
    "parse_log",
    "read_log",
    "slug",
]

CALIBRATION_KINDS = ("bias", "dark", "flat")
FIELDS = ("start", "end", "name", "exposure", "ra", "dec")

# Observers' spellings of calibration names, after lower-casing and removing
# spaces, underscores and hyphens. Value: (kind, flat subtype).
_CALIBRATION_NAMES: dict[str, tuple[str, str]] = {
    "bias": ("bias", ""),
    "biases": ("bias", ""),
    "dark": ("dark", ""),
    "darks": ("dark", ""),
    "flat": ("flat", ""),
    "flats": ("flat", ""),
    "skyflat": ("flat", "sky"),
    "skyflats": ("flat", "sky"),
    "domeflat": ("flat", "dome"),
    "domeflats": ("flat", "dome"),
}

#: Files larger than this are not taken for an observing log (bytes).
MAX_LOG_BYTES = 1_000_000

_FITS_MAGIC = b"SIMPLE  ="
_FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".gz", ".bz2")


# --------------------------------------------------------------------------- types


@dataclass(frozen=True)
class LogEntry:
    """One accepted line of the observing log.

    Attributes
    ----------
    start, end : int
        First and last frame number covered (inclusive).
    name : str
        The name as written (decoded, stripped); a target or a calibration kind.
    kind : str
        ``"bias"``, ``"dark"``, ``"flat"`` or ``"object"``.
    flat_type : str
        ``"sky"``, ``"dome"`` or ``""`` (not a flat, or unspecified).
    exptime_s : float
        Exposure time from the log (seconds).
    ra_deg, dec_deg : float or None
        Pointing (ICRS, degrees); ``None`` when the line gives none.
    ra_text, dec_text : str
        The coordinates as written (``""`` when empty).
    line_no : int
        Line number in ``source`` (1-based).
    source : str
        The file (or label) the line came from.
    """

    start: int
    end: int
    name: str
    kind: str
    flat_type: str
    exptime_s: float
    ra_deg: float | None
    dec_deg: float | None
    ra_text: str = ""
    dec_text: str = ""
    line_no: int = 0
    source: str = ""

    def covers(self, frame_number: int) -> bool:
        """True if ``frame_number`` lies in ``start..end`` (inclusive)."""
        return self.start <= frame_number <= self.end

    @property
    def is_calibration(self) -> bool:
        """True for bias, dark and flat lines."""
        return self.kind != "object"

    @property
    def has_coordinates(self) -> bool:
        """True if the line gives both RA and Dec."""
        return self.ra_deg is not None and self.dec_deg is not None

    def fingerprint(self) -> str:
        """A short digest of what the line says about its frames.

        Line number, file and the frame range are left out on purpose: a
        comment inserted above the line, the log being copied elsewhere, or a
        line whose end grows as the night goes on (``5,5`` then ``5,7``) does
        not change what a frame it covers is, so it must not trigger
        re-processing.
        """
        text = "\x1f".join(
            [
                self.name,
                self.kind,
                self.flat_type,
                repr(self.exptime_s),
                repr(self.ra_deg),
                repr(self.dec_deg),
            ]
        )
        return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class LogProblem:
    """A log line that was not accepted, and why.

    Attributes
    ----------
    file : str
        The log file (or label) in which the line is.
    line_no : int
        Line number (1-based; 0 for a problem with the whole file).
    field : str
        ``start``, ``end``, ``name``, ``exposure``, ``ra``, ``dec``,
        ``fields`` (wrong count) or ``file``.
    reason_code : str
        Machine-readable reason, e.g. ``reversed_range``, ``overlap``.
    message : str
        A sentence for a human.
    """

    file: str
    line_no: int
    field: str
    reason_code: str
    message: str

    def __str__(self) -> str:
        name = Path(self.file).name if self.file else "<log>"
        where = f"line {self.line_no}" if self.line_no else "whole file"
        return f"{name} {where}, field {self.field}: {self.message}"


class ObservingLogError(ValueError):
    """A bad observing-log line, for callers that want to raise.

    Parameters
    ----------
    problem : LogProblem
        What was wrong; also available as ``.problem`` and ``.reason``.
    """

    def __init__(self, problem: LogProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem
        self.reason = problem.reason_code


@dataclass(frozen=True)
class ObservingLog:
    """The accepted entries of one or more logs, and the rejected lines.

    Attributes
    ----------
    entries : tuple of LogEntry
        Accepted lines in file order; their frame ranges do not overlap.
    problems : tuple of LogProblem
        Rejected lines (and undecodable files).
    source : str
        The file the log came from (several joined by ``;`` after a merge).
    unterminated_line : int or None
        Number of the last line if the data did not end with a newline. A
        log being written may have a half-written last line; a caller can
        wait until the file has settled before trusting that line.
    """

    entries: tuple[LogEntry, ...] = ()
    problems: tuple[LogProblem, ...] = ()
    source: str = ""
    unterminated_line: int | None = None
    _by_start: tuple[LogEntry, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_start", tuple(sorted(self.entries, key=lambda e: e.start)))

    def entry_for(self, frame_number: int) -> LogEntry | None:
        """The entry covering ``frame_number``, or ``None`` if no line does."""
        # Entries never overlap, so the last one starting at or before the
        # frame is the only candidate.
        lo, hi = 0, len(self._by_start)
        while lo < hi:
            mid = (lo + hi) // 2
            if self._by_start[mid].start <= frame_number:
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return None
        entry = self._by_start[lo - 1]
        return entry if entry.covers(frame_number) else None

    def fingerprint(self, frame_number: int) -> str | None:
        """Digest of the entry covering ``frame_number`` (``None`` if none).

        Compare it with the value stored when the frame was processed to
        tell whether a re-read of a growing log changed what the frame is.
        """
        entry = self.entry_for(frame_number)
        return entry.fingerprint() if entry else None

    @property
    def targets(self) -> tuple[str, ...]:
        """Names of the object lines, in order of first appearance."""
        return tuple(dict.fromkeys(e.name for e in self.entries if e.kind == "object"))

    def raise_first(self) -> None:
        """Raise :class:`ObservingLogError` for the first problem, if any."""
        if self.problems:
            raise ObservingLogError(self.problems[0])


# --------------------------------------------------------------------------- parsing


class _LineError(Exception):
    def __init__(self, field_name: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.reason = reason
        self.message = message


def classify_name(name: str) -> tuple[str, str]:
    """Kind and flat subtype of a log name.

    Parameters
    ----------
    name : str
        The ``name`` field of a log line.

    Returns
    -------
    kind, flat_type : str
        ``("flat", "sky")`` for ``"SkyFlat"``, ``("object", "")`` for ``"OJ287"``.
    """
    key = re.sub(r"[\s_\-]+", "", name).lower()
    return _CALIBRATION_NAMES.get(key, ("object", ""))


def _frame_number(text: str, field_name: str) -> int:
    if not text:
        raise _LineError(field_name, "missing", f"{field_name} frame number is empty")
    if not re.fullmatch(r"[+]?\d+", text):
        raise _LineError(
            field_name, "not_a_number", f"{field_name} frame {text!r} is not a whole number"
        )
    return int(text)


def _exposure(text: str) -> float:
    if not text:
        raise _LineError("exposure", "missing", "exposure time is empty")
    # Observers sometimes write the unit; accept "300s" / "300 sec".
    m = re.fullmatch(r"([^a-zA-Z\s]+)\s*(?:s|sec|secs|seconds)?", text, flags=re.IGNORECASE)
    try:
        if not m:
            raise ValueError
        value = float(m.group(1))
    except ValueError:
        raise _LineError(
            "exposure", "not_a_number", f"exposure {text!r} is not a number of seconds"
        ) from None
    if not value >= 0 or value == float("inf"):
        raise _LineError(
            "exposure", "out_of_range", f"exposure {text!r} must be a finite number >= 0 s"
        )
    return value


_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _angle(text: str, field_name: str, sexagesimal_unit: u.Unit) -> float:
    """Parse one coordinate to degrees (range not checked here)."""
    label = "RA" if field_name == "ra" else "Dec"
    if _PLAIN_NUMBER.fullmatch(text):
        unit = u.deg  # a plain number is decimal degrees for both axes
    elif re.search(r"[hdms°'\"]", text, flags=re.IGNORECASE):
        unit = None  # the string carries its own units, e.g. 08h54m48s
    else:
        unit = sexagesimal_unit
    try:
        with warnings.catch_warnings():
            # Astropy only warns on 60 seconds or minutes and rounds up; in a
            # hand-written log that is a typo, so treat it as an error.
            warnings.simplefilter("error")
            angle = Angle(text, unit=unit)
    except Warning as warning:
        # e.g. "'second' was found to be '60', which is not in range [0,60)"
        m = re.search(r"'(\w+)' was found\s+to be '([^']+)'", str(warning))
        part, value = m.groups() if m else ("field", "?")
        if part == "hour":
            raise _LineError(field_name, "out_of_range", f"RA {text!r} is outside 0-24 h") from None
        raise _LineError(
            field_name,
            "bad_coordinate",
            f"{label} {text!r} has {part}s = {value}, must be below 60",
        ) from None
    except RangeError as exc:
        # astropy says "An invalid value for 'minute' was found ('61')": a typo
        # in one part, not a position outside the sky.
        m = re.search(r"'(minute|second)s?' was found \('([^']+)'\)", str(exc))
        if m:
            raise _LineError(
                field_name,
                "bad_coordinate",
                f"{label} {text!r} has {m.group(1)}s = {m.group(2)}, must be below 60",
            ) from None
        raise _LineError(
            field_name,
            "out_of_range",
            f"{label} {text!r} is outside " + ("0-24 h" if field_name == "ra" else "-90..+90 deg"),
        ) from None
    except Exception as exc:  # astropy raises ValueError, u.UnitsError or warnings
        detail = str(exc).split("\n")[0]
        expected = "hh:mm:ss" if field_name == "ra" else "+dd:mm:ss"
        raise _LineError(
            field_name,
            "bad_coordinate",
            f"{label} {text!r} is not an angle (expected {expected} or degrees: {detail})",
        ) from None
    return float(angle.to_value(u.deg))


def _coordinates(ra_text: str, dec_text: str) -> tuple[float | None, float | None]:
    if not ra_text and not dec_text:
        return None, None
    if not ra_text:
        raise _LineError("ra", "missing", f"Dec {dec_text!r} is given without an RA")
    if not dec_text:
        raise _LineError("dec", "missing", f"RA {ra_text!r} is given without a Dec")
    ra = _angle(ra_text, "ra", u.hourangle)
    if not 0.0 <= ra < 360.0:
        raise _LineError("ra", "out_of_range", f"RA {ra_text!r} is outside 0-24 h")
    dec = _angle(dec_text, "dec", u.deg)
    if not -90.0 <= dec <= 90.0:
        raise _LineError("dec", "out_of_range", f"Dec {dec_text!r} is outside -90..+90 deg")
    return ra, dec


def _strip_comment(line: str) -> str:
    # Target names do not contain '#', so everything after one is a comment.
    return line.split("#", 1)[0].strip()


def parse_line(text: str, line_no: int = 0, source: str = "") -> LogEntry | None:
    """Parse one log line.

    Parameters
    ----------
    text : str
        The decoded line, with or without its line ending.
    line_no : int
        Its line number, for the entry and error messages.
    source : str
        The file it came from, for the entry and error messages.

    Returns
    -------
    LogEntry or None
        ``None`` for a blank or comment-only line.

    Raises
    ------
    ObservingLogError
        If the line is malformed; the message names file, line and field.
    """
    body = _strip_comment(text.lstrip("\ufeff"))
    if not body:
        return None
    # NFKC turns full-width commas, digits and colons typed with a Chinese
    # input method into ASCII; the name itself is kept as written.
    fields = [f.strip() for f in body.replace("\uff0c", ",").split(",")]
    fields = [f if i == 2 else unicodedata.normalize("NFKC", f) for i, f in enumerate(fields)]
    # Trailing commas ("1,10,bias,1,,,") and missing empty coordinates
    # ("1,10,bias,1") both mean "no pointing".
    while len(fields) > 4 and not fields[-1]:
        fields.pop()
    try:
        if len(fields) not in (4, 6):
            if len(fields) == 5:
                raise _LineError("dec", "missing", f"RA {fields[4]!r} is given without a Dec")
            raise _LineError(
                "fields",
                "field_count",
                f"{len(fields)} fields, expected 6 (start,end,name,exposure,ra,dec)",
            )
        fields += [""] * (6 - len(fields))
        start = _frame_number(fields[0], "start")
        end = _frame_number(fields[1], "end")
        if start > end:
            raise _LineError("start", "reversed_range", f"start frame {start} > end frame {end}")
        name = fields[2]
        if not name:
            raise _LineError("name", "missing", "target or calibration name is empty")
        if any(unicodedata.category(c) == "Cc" for c in name):
            raise _LineError("name", "bad_name", f"name {name!r} contains control characters")
        exptime_s = _exposure(fields[3])
        ra_deg, dec_deg = _coordinates(fields[4], fields[5])
    except _LineError as err:
        raise ObservingLogError(
            LogProblem(source, line_no, err.field, err.reason, err.message)
        ) from None
    kind, flat_type = classify_name(name)
    return LogEntry(
        start=start,
        end=end,
        name=name,
        kind=kind,
        flat_type=flat_type,
        exptime_s=exptime_s,
        ra_deg=ra_deg,
        dec_deg=dec_deg,
        ra_text=fields[4],
        dec_text=fields[5],
        line_no=line_no,
        source=source,
    )


def _decode_lines(data: bytes | str, encodings: Sequence[str]) -> tuple[list[str], bool, list[int]]:
    """Split into decoded lines; also whether the data ended with a newline
    and the numbers of lines that no encoding could decode."""
    if isinstance(data, str):
        text = data.lstrip("\ufeff")
        terminated = text.endswith(("\n", "\r"))
        # Only CR and LF end a line, as for bytes (str.splitlines would also
        # split at form feeds and Unicode separators).
        lines = re.split(r"\r\n|\r|\n", text)
        if terminated:
            lines.pop()
        return lines, terminated, []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    terminated = data.endswith((b"\n", b"\r"))
    # Decode line by line: an observer who pastes a GBK name into a UTF-8
    # file should lose one line at most, not the whole log. Splitting the
    # bytes first is safe because no GB18030 multi-byte sequence contains
    # an LF or CR byte.
    raw_lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if terminated:
        raw_lines.pop()
    lines: list[str] = []
    bad: list[int] = []
    for n, raw in enumerate(raw_lines, start=1):
        for enc in encodings:
            try:
                lines.append(raw.decode(enc))
                break
            except (UnicodeDecodeError, LookupError):
                continue
        else:
            lines.append(raw.decode("utf-8", errors="replace"))
            bad.append(n)
    return lines, terminated, bad


def parse_log(
    data: bytes | str,
    source: str = "",
    encodings: Sequence[str] = ObslogConfig.encodings,
) -> ObservingLog:
    """Parse a whole observing log, keeping the good lines.

    Parameters
    ----------
    data : bytes or str
        The file's content. Bytes are decoded line by line with the first
        of ``encodings`` that works.
    source : str
        The file name, used in entries and messages.
    encodings : sequence of str
        Encodings to try in order (default UTF-8 with optional BOM, then GB18030).

    Returns
    -------
    ObservingLog
        Accepted entries (in file order, non-overlapping) and problems. A
        line overlapping an earlier accepted line is rejected; the earlier
        one is kept.
    """
    lines, terminated, undecodable = _decode_lines(data, encodings)
    entries: list[LogEntry] = []
    problems: list[LogProblem] = []
    for n, line in enumerate(lines, start=1):
        if n in undecodable and _strip_comment(line):
            problems.append(
                LogProblem(
                    source,
                    n,
                    "name",
                    "encoding",
                    f"line is not valid text in any of {', '.join(encodings)}",
                )
            )
            continue
        try:
            entry = parse_line(line, n, source)
        except ObservingLogError as err:
            problems.append(err.problem)
            continue
        if entry is None:
            continue
        clash = _first_overlap(entry, entries)
        if clash is not None:
            problems.append(_overlap_problem(entry, clash))
            continue
        entries.append(entry)
    last = len(lines) if lines and not terminated else None
    return ObservingLog(tuple(entries), tuple(problems), source, last)


def _first_overlap(entry: LogEntry, accepted: Iterable[LogEntry]) -> LogEntry | None:
    for other in accepted:
        if entry.start <= other.end and other.start <= entry.end:
            return other
    return None


def _overlap_problem(entry: LogEntry, other: LogEntry) -> LogProblem:
    same_file = entry.source == other.source
    where = f"line {other.line_no}"
    if not same_file:
        where = f"{Path(other.source).name} {where}"
    same_range = (entry.start, entry.end) == (other.start, other.end)
    if same_range and entry.fingerprint() == other.fingerprint():
        return LogProblem(
            entry.source,
            entry.line_no,
            "start",
            "duplicate",
            f"frames {entry.start}-{entry.end} ({entry.name}) repeat {where}; "
            f"the duplicate is ignored",
        )
    return LogProblem(
        entry.source,
        entry.line_no,
        "start",
        "overlap",
        f"frames {entry.start}-{entry.end} ({entry.name}) overlap frames "
        f"{other.start}-{other.end} ({other.name}) of {where}; this line is ignored, "
        f"{where} is kept",
    )


def read_log(path: str | Path, cfg: ObslogConfig | None = None) -> ObservingLog:
    """Read and parse an observing-log file.

    Parameters
    ----------
    path : str or Path
        The log file.
    cfg : ObslogConfig, optional
        Gives the encodings to try (defaults if omitted).

    Returns
    -------
    ObservingLog
        As :func:`parse_log`. A file that cannot be read gives an empty log
        with one problem (``field="file"``, ``reason_code="unreadable"``)
        rather than an exception, so a watcher can retry later.
    """
    cfg = cfg or ObslogConfig()
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        problem = LogProblem(
            str(path), 0, "file", "unreadable", f"cannot read the log ({exc.strerror or exc})"
        )
        return ObservingLog((), (problem,), str(path))
    return parse_log(data, str(path), cfg.encodings)


def merge_logs(logs: Iterable[ObservingLog]) -> ObservingLog:
    """Join logs covering one frame-number sequence (e.g. a log split in two).

    Entries are taken log by log; one overlapping an entry already taken is
    moved to the problems, naming both files. Logs of different nights must
    not be merged: frame numbers restart each night.
    """
    entries: list[LogEntry] = []
    problems: list[LogProblem] = []
    sources: list[str] = []
    for log in logs:
        sources.append(log.source)
        problems.extend(log.problems)
        for entry in log.entries:
            clash = _first_overlap(entry, entries)
            if clash is None:
                entries.append(entry)
            else:
                problems.append(_overlap_problem(entry, clash))
    return ObservingLog(tuple(entries), tuple(problems), ";".join(sources))


# --------------------------------------------------------------------------- finding


def _read_candidate(path: Path) -> bytes | None:
    """The file's bytes if it could be a log (small, not FITS, not binary)."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_LOG_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if data.startswith(_FITS_MAGIC) or b"\x00" in data:
        return None
    return data


def _line_counts(path: Path, cfg: ObslogConfig) -> tuple[int, int] | None:
    """(lines that parse with a name containing a letter, non-comment lines)."""
    data = _read_candidate(path)
    if data is None:
        return None
    log = parse_log(data, str(path), cfg.encodings)
    good = sum(1 for e in log.entries if re.search(r"[^\W\d_]", e.name))
    return good, len(log.entries) + len(log.problems)


def looks_like_log(path: str | Path, cfg: ObslogConfig | None = None) -> bool:
    """Whether a file reads as an observing log, whatever its name.

    Parameters
    ----------
    path : str or Path
        Any file.
    cfg : ObslogConfig, optional
        Gives the encodings to try.

    Returns
    -------
    bool
        True for a small text file (not FITS, no NUL bytes, below
        :data:`MAX_LOG_BYTES`) of which more than half of the non-comment
        lines parse as log lines whose name contains a letter. The letter
        rule keeps a plain table of six numbers from passing as a log.
    """
    counts = _line_counts(Path(path), cfg or ObslogConfig())
    if counts is None:
        return False
    good, total = counts
    return good > 0 and good * 2 > total


def find_logs(
    folders: str | Path | Iterable[str | Path], cfg: ObslogConfig | None = None
) -> list[Path]:
    """Observing logs in one or more folders (not recursive).

    Parameters
    ----------
    folders : path or iterable of paths
        Folders to look in; missing folders are skipped.
    cfg : ObslogConfig, optional
        ``name_glob`` (e.g. ``*.log``) and encodings.

    Returns
    -------
    list of Path
        Sorted, unique. A file matching ``name_glob`` is taken if it is a
        small text file with no log lines yet (a log just started) or with
        at least one valid line, so a badly typed log is still read and its
        problems reported, while a camera's own ``*.log`` of prose is not. Any
        other file is taken if :func:`looks_like_log` says so.
    """
    cfg = cfg or ObslogConfig()
    if isinstance(folders, str | Path):
        folders = [folders]
    found: set[Path] = set()
    for folder in folders:
        folder = Path(folder)
        try:
            children = list(folder.iterdir())
        except OSError:
            continue
        found.update(child for child in children if is_log_file(child, cfg))
    return sorted(found)


def is_log_file(path: str | Path, cfg: ObslogConfig | None = None) -> bool:
    """Whether one file is an observing log, by the rules of :func:`find_logs`.

    The daemon asks this of the one file an event names, so a folder of
    thousands of files is not read again at every event.
    """
    cfg = cfg or ObslogConfig()
    path = Path(path)
    if path.name.lower().endswith(_FITS_SUFFIXES):
        return False  # frames: skip without reading megabytes
    if fnmatch.fnmatch(path.name, cfg.name_glob):
        counts = _line_counts(path, cfg)
        return counts is not None and (counts[0] > 0 or counts[1] == 0)
    return looks_like_log(path, cfg)


# --------------------------------------------------------------------------- names


_SLUG_MAX = 64


def slug(name: str) -> str:
    """A file-name-safe, stable form of a target name.

    Parameters
    ----------
    name : str
        Any target name from a log (may be non-ASCII or hostile).

    Returns
    -------
    str
        Only ``[A-Za-z0-9._+-]``, 1 to 64 characters, never starting with
        ``.`` or ``-`` (so never ``..`` and never an option). Accents are
        transliterated (``Vénus`` -> ``Venus``); runs of anything else become
        ``_``. When characters had to be dropped (e.g. a Chinese name) or the
        name was cut, ``-`` and 8 hex digits of a SHA-1 of the original name
        are appended so that distinct names keep distinct slugs.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_text = decomposed.encode("ascii", "ignore").decode("ascii")
    # Accents decompose into a letter plus a combining mark and lose nothing
    # that matters; any other non-ASCII character is lost information.
    lost = any(ord(c) > 127 and not unicodedata.combining(c) for c in decomposed)
    text = re.sub(r"[^A-Za-z0-9._+-]+", "_", ascii_text)
    # ".." anywhere reads like a parent folder to a human; make it a separator.
    text = re.sub(r"\.{2,}", "_", text)
    text = re.sub(r"_+", "_", text).lstrip("._-").rstrip("._")
    digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not text:
        return f"target-{digest}"
    if lost or len(text) > _SLUG_MAX:
        text = text[: _SLUG_MAX - 9].rstrip("._-+") or "target"
        return f"{text}-{digest}"
    return text
