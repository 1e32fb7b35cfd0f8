"""The observing logs of the watched folders, read once and again when they change.

A frame's log line may be in a log in its own folder or in any folder above
it up to the outermost watched folder holding it (so the order and nesting of
``--watch`` folders do not matter); logs grow during the night, so each is
re-read when its modification time changes, and the frames waiting for a log
line are looked at again (:meth:`Logbook.take_changes`). Which files of a
folder are logs is found once per folder and then kept up to date from the
events, one file at a time: a folder of thousands of files is not read again
at every event.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from photd.config import ObslogConfig
from photd.obslog import LogEntry, ObservingLog, is_log_file, merge_logs, read_log

#: Suffixes a log file may have (an event on such a file may be a new log).
LOG_SUFFIXES = (".log", ".txt", ".csv", ".lst", "")


def watched_root(path: Path, roots: list[Path]) -> Path | None:
    """The outermost watched folder ``path`` lies in, or None.

    Outermost, whatever the order of the ``--watch`` flags: with
    ``--watch NIGHT/g --watch NIGHT`` a frame in ``NIGHT/g`` finds the log
    in ``NIGHT``.
    """
    holding = [root for root in roots if path.is_relative_to(root)]
    return min(holding, key=lambda r: len(r.parts), default=None)


def storable(path: str | Path) -> str:
    """``path`` as text SQLite and JSON can hold: bytes that are not UTF-8 as ``\\xNN``."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", errors="backslashreplace")


def is_storable(path: str | Path) -> bool:
    """True if the name is valid UTF-8 (a name that is not cannot be a frame's identity)."""
    return storable(path) == os.fspath(path)


class Logbook:
    """Observing logs per folder, parsed and cached by modification time."""

    def __init__(self, cfg: ObslogConfig, roots: list[Path], log: Any) -> None:
        self.cfg = cfg
        self.roots = roots
        self.log = log
        self._parsed: dict[Path, tuple[float, ObservingLog]] = {}
        # Which files of a folder are logs: found once (every candidate read), then
        # kept up to date one file per event, and found again at a rescan.
        self._found: dict[Path, set[Path]] = {}
        # (the merged logs keep their parts alive, so the parts' ids stay unique)
        self._merged: dict[tuple, tuple[tuple, ObservingLog]] = {}
        self._changed = False

    def read_folder(self, folder: Path) -> list[ObservingLog]:
        """The logs in ``folder`` (not above it), re-read if they changed."""
        out = []
        found = self._found.get(folder)
        if found is None:
            found = self._found[folder] = self._find(folder)
        for p in sorted(found):
            try:
                mtime = p.stat().st_mtime
            except OSError:
                continue
            cached = self._parsed.get(p)
            if cached is None or cached[0] != mtime:
                parsed = read_log(p, self.cfg)
                for problem in parsed.problems:
                    self.log.warning("observing log problem", stage="obslog",
                                     reason=problem.reason_code, error=str(problem))
                self._parsed[p] = cached = (mtime, parsed)
                # Whoever read it first (a frame's lookup or the log's own event), the
                # frames already waiting must be looked at again: the main loop does it.
                self._changed = True
            out.append(cached[1])
        return out

    def _find(self, folder: Path) -> set[Path]:
        """The logs of one folder (every file read once: a rescan or a first look)."""
        try:
            children = [folder / e.name for e in os.scandir(folder) if e.is_file()]
        except OSError:
            return set()
        return {c for c in children if is_storable(c) and is_log_file(c, self.cfg)}

    def read_all(self, folders: Iterable[Path]) -> None:
        """Every folder a rescan walked (:func:`photd.watcher.walk`: depth-limited)."""
        for folder in folders:
            self.read_folder(folder)

    def file_changed(self, path: Path) -> None:
        """A file that is not a frame changed: it may have become (or stopped being) a log.

        Only that file is looked at; the folder's other files keep their verdict.
        """
        found = self._found.get(path.parent)
        if found is None:
            if path.suffix.lower() in LOG_SUFFIXES and path.is_file():
                self.read_folder(path.parent)  # first look at this folder
            return
        was = path in found
        now = is_storable(path) and is_log_file(path, self.cfg)
        if now:
            found.add(path)
        else:
            found.discard(path)
        if now or was:
            if was and not now:
                self._parsed.pop(path, None)
                self._changed = True  # a log went: frames it covered are judged again
            self.read_folder(path.parent)

    def any_log(self) -> bool:
        """Whether any observing log has been read."""
        return bool(self._parsed)

    def forget_found(self) -> None:
        """Look for log files again everywhere (before a rescan)."""
        self._found.clear()

    def take_changes(self) -> bool:
        """Whether a log was (re)read since the last call."""
        changed, self._changed = self._changed, False
        return changed

    def entry_for(self, frame: dict) -> tuple[LogEntry | None, str]:
        """The log line covering a frame: logs in its folder or any folder above it."""
        raw = Path(frame["path"])
        root = watched_root(raw, self.roots) or raw.parent
        folders = []
        folder = raw.parent
        while True:
            folders.append(folder)
            if folder == root or folder.parent == folder:
                break
            folder = folder.parent
        logs = [lg for f in folders for lg in self.read_folder(f)]
        if not logs:
            return None, f"no observing log found in {raw.parent} or above it"
        key = tuple(id(lg) for lg in logs)
        if key not in self._merged:
            if len(self._merged) > 64:
                self._merged.clear()
            self._merged[key] = (tuple(logs), merge_logs(logs))
        merged = self._merged[key][1]
        entry = merged.entry_for(frame["frame_number"])
        if entry is None:
            return None, (f"frame {frame['frame_number']} is not covered by "
                          f"{', '.join(sorted({Path(lg.source).name for lg in logs}))}")
        return entry, ""

    def entries(self) -> Iterator[LogEntry]:
        """Every line of every log read so far."""
        for _mtime, parsed in self._parsed.values():
            yield from parsed.entries

    def target_entries(self, target: str) -> list[LogEntry]:
        """The lines observing ``target``, in the order the logs were read."""
        return [e for e in self.entries() if e.name == target and not e.is_calibration]
