"""The observing logs of the watched folders, read once and again when they change.

A frame's log line may be in a log in its own folder or in any folder above
it up to the watched root; logs grow during the night, so each is re-read
when its modification time changes, and the frames waiting for a log line
are looked at again (:meth:`Logbook.take_changes`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from photd.config import ObslogConfig
from photd.obslog import LogEntry, ObservingLog, find_logs, merge_logs, read_log

#: Suffixes a log file may have (an event on such a file may be a new log).
LOG_SUFFIXES = (".log", ".txt", ".csv", ".lst", "")


def watched_root(path: Path, roots: list[Path]) -> Path | None:
    """The watched folder ``path`` lies in, or None."""
    for root in roots:
        try:
            path.relative_to(root)
            return root
        except ValueError:
            continue
    return None


class Logbook:
    """Observing logs per folder, parsed and cached by modification time."""

    def __init__(self, cfg: ObslogConfig, roots: list[Path], log: Any) -> None:
        self.cfg = cfg
        self.roots = roots
        self.log = log
        self._parsed: dict[Path, tuple[float, ObservingLog]] = {}
        # Which files of a folder are logs (find_logs reads every candidate): kept
        # until a non-frame file changes or a rescan, the only ways a log appears.
        self._found: dict[Path, list[Path]] = {}
        # (the merged logs keep their parts alive, so the parts' ids stay unique)
        self._merged: dict[tuple, tuple[tuple, ObservingLog]] = {}
        self._changed = False

    def read_folder(self, folder: Path) -> list[ObservingLog]:
        """The logs in ``folder`` (not above it), re-read if they changed."""
        out = []
        found = self._found.get(folder)
        if found is None:
            found = self._found[folder] = find_logs(folder, self.cfg)
        for p in found:
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

    def read_all(self) -> None:
        """Every folder of every watched root (a rescan)."""
        for root in self.roots:
            for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
                self.read_folder(folder)

    def file_changed(self, path: Path) -> None:
        """A file that is not a frame changed: it may have become (or stopped being) a log."""
        self._found.pop(path.parent, None)
        if path.suffix.lower() in LOG_SUFFIXES and path.is_file():
            self.read_folder(path.parent)

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
