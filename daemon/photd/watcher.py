"""Watching camera folders: filesystem events, rescans and the completeness test.

A camera on a network share writes a frame in pieces under its final name, so
an event alone does not mean a frame is ready: :func:`check_complete` reads
the header and compares the file size with the size the header implies
(header blocks + data, padded to 2880 bytes).
"""

from __future__ import annotations

import hashlib
import os
import queue
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

BLOCK = 2880
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.fz")


@dataclass(frozen=True)
class Completeness:
    """Result of :func:`check_complete`.

    ``complete`` is true when the file holds its whole header and data;
    ``reason`` is ``None`` then, else ``empty``, ``partial_header``,
    ``truncated`` (shorter than its header implies), ``not_fits``,
    ``header_too_large`` (no END card in :data:`MAX_HEADER_BLOCKS` blocks),
    ``unreadable`` or ``outside_watch`` (a link resolving out of the watched
    folders). ``expected_size`` is in bytes when known.
    """

    complete: bool
    reason: str | None
    size: int
    expected_size: int | None = None
    message: str = ""


def is_frame_name(path: str | Path) -> bool:
    """True if the file name looks like a FITS frame (ignores temporary names)."""
    name = Path(path).name.lower()
    if name.startswith(".") or name.endswith((".part", ".tmp", "~")):
        return False
    return name.endswith(FITS_SUFFIXES)


#: A header longer than this (576 kB) is not a camera's: no END card by then means
#: the file is something else, not a frame still being written.
MAX_HEADER_BLOCKS = 200


class HeaderTooLarge(ValueError):
    """No END card within :data:`MAX_HEADER_BLOCKS` blocks."""


def _header_cards(fh) -> tuple[dict[str, str], int] | None:
    """Parse raw 80-character cards up to END; returns (cards, header bytes) or None.

    None: the file ends before END (still being written); raises
    :class:`HeaderTooLarge` past :data:`MAX_HEADER_BLOCKS` blocks.
    """
    cards: dict[str, str] = {}
    nbytes = 0
    while True:
        block = fh.read(BLOCK)
        if len(block) < BLOCK:
            return None
        nbytes += BLOCK
        for k in range(0, BLOCK, 80):
            card = block[k:k + 80].decode("ascii", errors="replace")
            key = card[:8].strip()
            if key == "END":
                return cards, nbytes
            if card[8:10] == "= ":
                cards[key] = card[10:].split("/")[0].strip()
        if nbytes >= MAX_HEADER_BLOCKS * BLOCK:  # no END in 576 kB: not a camera header
            raise HeaderTooLarge(f"no END card in the first {nbytes} bytes of the header")


_BITPIX = (8, 16, 32, 64, -32, -64)


def _hdu_data_bytes(cards: dict[str, str]) -> int:
    """Data size the cards imply, padded to whole blocks.

    Raises ValueError for values no FITS writer produces: checked before
    looping, because a hostile ``NAXIS = 1000000000`` would otherwise stall
    the daemon's main loop for minutes.
    """
    bitpix = int(cards.get("BITPIX", "8"))
    naxis = int(cards.get("NAXIS", "0"))
    if bitpix not in _BITPIX or not 0 <= naxis <= 999:
        raise ValueError(f"BITPIX = {bitpix}, NAXIS = {naxis}")
    bitpix = abs(bitpix)
    if naxis == 0:
        return 0
    n = 1
    for k in range(1, naxis + 1):
        length = int(cards.get(f"NAXIS{k}", "0"))
        if length < 0:
            raise ValueError(f"NAXIS{k} = {length}")
        n *= length
    pcount = int(cards.get("PCOUNT", "0") or 0)
    gcount = int(cards.get("GCOUNT", "1") or 1)
    nbytes = bitpix // 8 * gcount * (pcount + n)
    return -(-nbytes // BLOCK) * BLOCK


def outside_roots(path: str | Path, roots: Iterable[str | Path]) -> bool:
    """True if ``path``, links resolved, lies in none of ``roots`` (resolved too)."""
    real = Path(os.path.realpath(path))
    return not any(real.is_relative_to(os.path.realpath(r)) for r in roots)


def check_complete(path: str | Path, roots: Iterable[str | Path] | None = None) -> Completeness:
    """Is this FITS file completely written?

    Walks every HDU's header and adds up the sizes the headers imply, so a
    file still being written (or cut short) is recognised without reading
    its data. With ``roots`` (the watched folders), a file whose real path
    lies outside all of them (a symbolic link out of the camera folders) is
    refused unread as ``outside_watch``: photd reads what the cameras wrote,
    not whatever a link in their folder points at.
    """
    path = Path(path)
    if roots is not None and outside_roots(path, roots):
        return Completeness(False, "outside_watch", 0,
                            message=f"resolves to {os.path.realpath(path)}, outside the "
                                    "watched folders")
    try:
        size = path.stat().st_size
        if size == 0:
            return Completeness(False, "empty", 0, message="file is empty")
        with open(path, "rb") as fh:
            first = fh.read(9)
            if first != b"SIMPLE  ="[:len(first)]:
                return Completeness(False, "not_fits", size,
                                    message="does not start with a FITS SIMPLE card")
            fh.seek(0)
            expected = 0
            while True:
                if expected:
                    # After an HDU: another one only if an XTENSION card begins
                    # here (bytes that do not are trailing padding, tolerated).
                    start = fh.read(8)
                    if not start or not b"XTENSION".startswith(start[:8]):
                        break
                    fh.seek(expected)
                parsed = _header_cards(fh)
                if parsed is None:
                    if expected == 0:
                        return Completeness(False, "partial_header", size,
                                            message="header incomplete (no END card yet)")
                    # A multi-extension file being written: the primary HDU is
                    # whole but the next header is not yet.
                    return Completeness(False, "truncated", size, None,
                                        f"extension header at byte {expected} is incomplete")
                cards, hbytes = parsed
                try:
                    expected += hbytes + _hdu_data_bytes(cards)
                except ValueError as exc:
                    return Completeness(False, "not_fits", size,
                                        message=f"NAXIS/BITPIX cards are not valid FITS: {exc}")
                if expected >= size:
                    break
                fh.seek(expected)
    except HeaderTooLarge as exc:
        return Completeness(False, "header_too_large", size, message=str(exc))
    except OSError as exc:
        return Completeness(False, "unreadable", 0, message=f"cannot read: {exc.strerror}")
    if size < expected:
        return Completeness(False, "truncated", size, expected,
                            f"{size} bytes of {expected} the header implies")
    return Completeness(True, None, size, expected)


def sha256_of(path: str | Path) -> str:
    """SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: Folders nested deeper than this below a watched folder are not looked into
#: (a camera writes a few levels: night, band; a thousand is an accident or an attack).
MAX_DEPTH = 16


@dataclass
class Tree:
    """What :func:`walk` found below the watched folders.

    ``files`` and ``folders`` are sorted; ``too_deep`` lists the folders at
    the depth limit whose contents were not looked into.
    """

    files: list[Path]
    folders: list[Path]
    too_deep: list[Path]


def walk(folders: Iterable[str | Path], *, max_depth: int = MAX_DEPTH) -> Tree:
    """Every file and folder below the watched folders, to ``max_depth`` levels.

    Iterative (an explicit stack, no recursion), so no nesting can exhaust
    Python's recursion limit; hidden names are skipped, links to folders are
    not followed, and a folder that vanishes or cannot be read is passed over.
    """
    files: list[Path] = []
    dirs: list[Path] = []
    too_deep: list[Path] = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        stack = [(root, 0)]
        while stack:
            here, depth = stack.pop()
            dirs.append(here)
            try:
                with os.scandir(here) as entries:
                    listing = [(e.name, e.is_dir(follow_symlinks=False),
                                e.is_symlink() and e.is_dir()) for e in entries
                               if not e.name.startswith(".")]
            except OSError:
                continue
            for name, is_dir, links_to_dir in listing:
                if links_to_dir:
                    continue
                if not is_dir:
                    files.append(here / name)
                elif depth + 1 > max_depth:
                    too_deep.append(here / name)
                else:
                    stack.append((here / name, depth + 1))
    return Tree(sorted(files), sorted(dirs), sorted(too_deep))


def scan(folders: Iterable[str | Path], *, max_depth: int = MAX_DEPTH) -> Iterator[Path]:
    """Every file below the watched folders (frames and candidate logs), sorted."""
    yield from walk(folders, max_depth=max_depth).files


class _Handler(FileSystemEventHandler):
    def __init__(self, events: queue.Queue[Path]) -> None:
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        # close-write is the moment a camera finished; created/modified catch
        # writers and observers (polling) that never report a close; moved
        # catches files renamed into place.
        if event.event_type in ("closed", "created", "modified"):
            self.events.put(Path(os.fsdecode(event.src_path)))
        elif event.event_type == "moved":
            self.events.put(Path(os.fsdecode(event.dest_path)))


class FolderWatcher:
    """watchdog observers on every watched folder, feeding one queue of paths.

    Parameters
    ----------
    folders : iterable of path
        Folders to watch recursively (new night folders appear inside them).
    polling : bool
        Use a polling observer (network shares where inotify does not fire).
    poll_interval_s : float
        Polling period in seconds.
    """

    def __init__(self, folders: Iterable[str | Path], *, polling: bool = False,
                 poll_interval_s: float = 2.0) -> None:
        self.events: queue.Queue[Path] = queue.Queue()
        self.problem: str | None = None
        self.observer = (PollingObserver(timeout=poll_interval_s) if polling else Observer())
        handler = _Handler(self.events)
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)
            self.observer.schedule(handler, str(folder), recursive=True)

    def start(self) -> str | None:
        """Start the observer threads; returns why events are unavailable, or None.

        watchdog walks the folders recursively to place its watches; a tree
        nested beyond Python's recursion limit (or out of inotify watches)
        makes that fail. photd then goes on with its periodic rescans alone,
        which find every file :func:`walk` reaches.
        """
        try:
            self.observer.start()
        except (RecursionError, OSError) as exc:
            self.problem = f"{type(exc).__name__}: {exc}"
            return self.problem
        return None

    def alive(self) -> bool:
        """True while the observer and every one of its event threads run."""
        if self.problem is not None or not self.observer.is_alive():
            return False
        return all(e.is_alive() for e in self.observer.emitters)

    def stop(self) -> None:
        """Stop and join the observer threads."""
        self.observer.stop()
        if self.observer.is_alive():
            self.observer.join(timeout=5)

    def drain(self, timeout_s: float = 0.0) -> list[Path]:
        """Paths reported since the last call (unique, in order of first report)."""
        out: dict[Path, None] = {}
        try:
            out[self.events.get(timeout=timeout_s) if timeout_s else
                self.events.get_nowait()] = None
            while True:
                out[self.events.get_nowait()] = None
        except queue.Empty:
            pass
        return list(out)
