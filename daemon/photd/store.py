"""The SQLite store: photd's journal and single source of truth.

One writer (the daemon's main process) and any number of readers
(``photd status``, ``photd tail --follow``, exports). The database runs in
WAL mode, so readers never block the writer and the writer never blocks
readers; a reader that holds a read transaction keeps seeing the snapshot it
started with.

The daemon can be killed (``kill -9``) at any instant. Every state transition
is one committed transaction, and a science frame's measurements are written
in the same transaction as its final state (:meth:`Store.finish_frame`), so
after a crash a frame either has its old results and old state or its new
results and new state, never a mixture. Re-processing a frame deletes its old
rows before inserting the new ones, inside that transaction: results are
replaced, never duplicated.

Every value reaches SQL as a bound parameter. Column names are never taken
from callers unchecked: they are validated against the table's real columns
(read from the database after migrations) before they appear in a statement.

The schema is created and evolved by :data:`MIGRATIONS`, applied in order;
``PRAGMA user_version`` records how many have run. To add a column later,
append a migration; :meth:`Store.replace_measurements` and friends pick up
the new column automatically.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from photd.flags import FLAGS

# --------------------------------------------------------------------------
# Frame states
# --------------------------------------------------------------------------

#: Every state a frame can be in, with its meaning.
STATES: dict[str, str] = {
    "arrived": "file complete and recorded; nothing done yet (also after its content changed)",
    "waiting_log": "no observing-log line covers this frame number yet",
    "waiting_catalog": "reference catalog unavailable for this field; retried later",
    "queued": "its log line is known; waiting for a worker (or for newer masters)",
    "processing": "handed to a worker (headers, calibration, astrometry, photometry)",
    "calibration": "a bias/dark/flat frame that went into the night's master",
    "rejected": "a calibration frame left out of the master (reason says why)",
    "done": "science frame measured; its measurements are in the store",
    "badfit": "astrometric or photometric quality gate failed (reason says which)",
    "failed": "unreadable or unprocessable input (truncated, not FITS, ...)",
}

#: States a frame does not leave on its own: :meth:`Store.unfinished` skips them.
TERMINAL_STATES: frozenset[str] = frozenset({"done", "badfit", "failed", "calibration", "rejected"})

#: TEXT columns that hold JSON; Python dicts/lists are encoded on write and
#: decoded on read.
JSON_COLUMNS: dict[str, frozenset[str]] = {
    "frames": frozenset({"timings"}),
    "calibrations": frozenset({"inputs"}),
    "detector_params": frozenset({"inputs"}),
    "solutions": frozenset({"header"}),
    "lightcurve": frozenset({"comparison"}),
}

# The writer waits this long for a lock before SQLITE_BUSY. With one writer
# the only contenders are checkpoints and a reader's WAL recovery, both short.
BUSY_TIMEOUT_MS = 5000

_CHECKPOINT_MODES = ("PASSIVE", "FULL", "RESTART", "TRUNCATE")


class StoreError(RuntimeError):
    """The store cannot be opened or used as asked (the message says why)."""


class UnknownFrameError(KeyError):
    """No frame with the given id or path is in the store."""


class StoreDamaged(StoreError):
    """The store file fails SQLite's check (a disk fault, a copy cut short).

    ``problem`` is what SQLite reported; ``backups`` the good backups there
    are, newest first (see :func:`restore_from_backup`).
    """

    def __init__(self, path: Path, problem: str, backups: Sequence[Path] = ()) -> None:
        self.path, self.problem, self.backups = Path(path), problem, list(backups)
        hint = (f"; the newest good backup is {self.backups[0]}" if self.backups
                else "; no good backup was found")
        super().__init__(f"{path} is damaged ({problem.splitlines()[0][:200]}){hint}")


#: Backups kept: ``photd.sqlite.bak`` (newest), ``.bak.1``, ``.bak.2``.
BACKUPS_KEPT = 3


#: SQLite result codes that say something about the disk or another process, not
#: about the data being written: the writer retries or stops, no frame is to blame.
_ENVIRONMENT_CODES = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED,
                      sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CORRUPT,
                      sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CANTOPEN)


def store_fault(exc: BaseException) -> bool:
    """True if ``exc`` is SQLite reporting a disk, lock or file problem (not bad data)."""
    if not isinstance(exc, sqlite3.Error):
        return False
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    text = str(exc).lower()
    return code in _ENVIRONMENT_CODES or any(
        t in text for t in ("disk is full", "is locked", "readonly", "malformed", "disk i/o"))


def backup_generations(dest_path: str | os.PathLike[str]) -> list[Path]:
    """The rotating backup files for ``dest_path``, newest first."""
    dest = Path(dest_path)
    return [dest] + [dest.with_name(f"{dest.name}.{k}") for k in range(1, BACKUPS_KEPT)]


def check_file(path: str | os.PathLike[str]) -> str:
    """``'ok'`` if ``path`` is a sound SQLite file (``PRAGMA quick_check``), else the problem."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: no such file"
    try:
        conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return "\n".join(str(row[0]) for row in rows)


def restore_from_backup(path: str | os.PathLike[str],
                        backups: Iterable[str | os.PathLike[str]]) -> tuple[Path, Path] | None:
    """Put the newest good backup in place of a damaged store, keeping the damaged file.

    The damaged file (and its ``-wal``/``-shm``) is renamed to
    ``<name>.damaged-<UTC time>`` beside it, never deleted. Frames finished
    after the backup was taken are simply processed again: the raw files are
    intact and re-processing replaces a frame's results.

    Returns
    -------
    (backup_used, damaged_copy) or None
        None when no backup passes the check (nothing is changed then).
    """
    path = Path(path)
    good = next((Path(b) for b in backups if check_file(b) == "ok"), None)
    if good is None:
        return None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            os.replace(src, Path(f"{aside}{suffix}"))
    tmp = path.with_name(f".{path.name}.restore-{os.getpid()}")
    with open(good, "rb") as src_fh, open(tmp, "wb") as dst_fh:
        for chunk in iter(lambda: src_fh.read(1 << 20), b""):
            dst_fh.write(chunk)
        dst_fh.flush()
        os.fsync(dst_fh.fileno())
    os.replace(tmp, path)
    return good, aside


# --------------------------------------------------------------------------
# Schema and migrations
# --------------------------------------------------------------------------

# Version 1: the initial schema. Times are Unix seconds (REAL) unless a name
# says otherwise; nights are 'YYYY-MM-DD' (the local date the night began).
_SCHEMA_V1 = (
    """
    CREATE TABLE nights (
        night       TEXT PRIMARY KEY,
        first_seen  REAL NOT NULL,
        notes       TEXT
    )
    """,
    """
    CREATE TABLE frames (
        id               INTEGER PRIMARY KEY,
        path             TEXT NOT NULL UNIQUE,
        size             INTEGER,
        mtime            REAL,
        sha256           TEXT,
        band             TEXT,
        frame_number     INTEGER,
        night            TEXT REFERENCES nights(night),
        kind             TEXT,
        target           TEXT,
        log_source       TEXT,
        log_line         INTEGER,
        log_fingerprint  TEXT,
        state            TEXT NOT NULL,
        reason           TEXT,
        output           TEXT,
        calib_version    TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        first_seen       REAL NOT NULL,
        updated          REAL NOT NULL,
        timings          TEXT,
        closed_at        REAL,
        done_at          REAL
    )
    """,
    "CREATE INDEX frames_state ON frames(state)",
    "CREATE INDEX frames_band_number ON frames(band, frame_number)",
    "CREATE INDEX frames_night ON frames(night)",
    """
    CREATE TABLE state_log (
        id        INTEGER PRIMARY KEY,
        frame_id  INTEGER NOT NULL REFERENCES frames(id) ON DELETE CASCADE,
        ts        REAL NOT NULL,
        state     TEXT NOT NULL,
        reason    TEXT
    )
    """,
    "CREATE INDEX state_log_frame ON state_log(frame_id)",
    """
    CREATE TABLE calibrations (
        id        INTEGER PRIMARY KEY,
        night     TEXT NOT NULL REFERENCES nights(night),
        band      TEXT NOT NULL,
        kind      TEXT NOT NULL,
        version   INTEGER NOT NULL,
        path      TEXT NOT NULL,
        n_inputs  INTEGER NOT NULL,
        inputs    TEXT NOT NULL,
        created   REAL NOT NULL,
        final     INTEGER NOT NULL DEFAULT 0 CHECK (final IN (0, 1)),
        UNIQUE (night, band, kind, version)
    )
    """,
    """
    CREATE TABLE detector_params (
        night           TEXT NOT NULL REFERENCES nights(night),
        band            TEXT NOT NULL,
        gain_e_per_adu  REAL NOT NULL,
        rdnoise_e       REAL NOT NULL,
        gain_err        REAL,
        rdnoise_err     REAL,
        inputs          TEXT,
        created         REAL NOT NULL,
        PRIMARY KEY (night, band)
    )
    """,
    """
    CREATE TABLE solutions (
        frame_id      INTEGER PRIMARY KEY REFERENCES frames(id) ON DELETE CASCADE,
        n_sources     INTEGER,
        n_matches     INTEGER,
        rms_arcsec    REAL,
        scale_arcsec  REAL,
        rotation_deg  REAL,
        fwhm_px       REAL,
        relative      INTEGER,
        header        TEXT,
        created       REAL NOT NULL
    )
    """,
    """
    CREATE TABLE measurements (
        frame_id       INTEGER NOT NULL REFERENCES frames(id) ON DELETE CASCADE,
        star_id        TEXT NOT NULL,
        target         TEXT,
        band           TEXT,
        mjd_mid        REAL,
        bjd_tdb        REAL,
        x_px           REAL,
        y_px           REAL,
        flux_e         REAL,
        flux_err_e     REAL,
        mag_inst       REAL,
        mag_inst_err   REAL,
        mag            REAL,
        mag_err        REAL,
        aperture_px    REAL,
        fwhm_px        REAL,
        airmass        REAL,
        calib_version  TEXT,
        flags          INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (frame_id, star_id)
    )
    """,
    "CREATE INDEX measurements_star ON measurements(star_id)",
    "CREATE INDEX measurements_target_band ON measurements(target, band)",
    """
    CREATE TABLE zeropoints (
        frame_id     INTEGER PRIMARY KEY REFERENCES frames(id) ON DELETE CASCADE,
        zp           REAL,
        zp_err       REAL,
        n_stars      INTEGER,
        scatter      REAL,
        colour_term  REAL
    )
    """,
    """
    CREATE TABLE lightcurve (
        frame_id          INTEGER NOT NULL REFERENCES frames(id) ON DELETE CASCADE,
        target            TEXT NOT NULL,
        band              TEXT,
        mjd               REAL,
        bjd_tdb           REAL,
        mag               REAL,
        mag_err           REAL,
        diff_mag          REAL,
        diff_mag_err      REAL,
        airmass           REAL,
        fwhm_arcsec       REAL,
        aperture_px       REAL,
        flags             INTEGER NOT NULL DEFAULT 0,
        ensemble_version  INTEGER,
        comparison        TEXT,
        PRIMARY KEY (frame_id, target)
    )
    """,
    "CREATE INDEX lightcurve_target_band_mjd ON lightcurve(target, band, mjd)",
)


def _migrate_v1_initial_schema(db: sqlite_utils.Database) -> None:
    # One statement at a time: executescript() would COMMIT the migration's
    # transaction half way through.
    for statement in _SCHEMA_V1:
        db.execute(statement)


def _migrate_v2_stale_lightcurves(db: sqlite_utils.Database) -> None:
    # A light curve whose measurements changed but which has not been derived
    # again yet: the mark is written with the measurements and cleared with
    # the new curve, so a restart knows which curves to finish.
    db.execute(
        """
        CREATE TABLE stale_lightcurves (
            target  TEXT NOT NULL,
            band    TEXT NOT NULL,
            since   REAL NOT NULL,
            PRIMARY KEY (target, band)
        )
        """
    )


def _migrate_v3_views_flags_targets(db: sqlite_utils.Database) -> None:
    # What an observer asks of the store with sqlite3, pandas or Datasette:
    # "the light curve of X" with the frame number and UT, and the frames'
    # states with readable times. Time columns of the tables stay Unix seconds
    # (REAL); the views put ISO UTC text beside them.
    db.execute(
        """
        CREATE VIEW lightcurve_ut AS
        SELECT l.target, l.band, f.night, f.frame_number AS frame,
               strftime('%Y-%m-%dT%H:%M:%f', (l.mjd - 40587.0) * 86400.0, 'unixepoch')
                   AS ut_iso,
               l.mjd AS mjd_utc, l.bjd_tdb, l.mag, l.mag_err, l.diff_mag, l.diff_mag_err,
               l.airmass, l.fwhm_arcsec, l.aperture_px, z.zp AS zero_point,
               z.zp_err AS zero_point_err, l.flags, l.ensemble_version, l.comparison,
               f.path AS raw_path, l.frame_id
        FROM lightcurve l
        JOIN frames f ON f.id = l.frame_id
        LEFT JOIN zeropoints z ON z.frame_id = l.frame_id
        """
    )
    db.execute(
        """
        CREATE VIEW frame_states AS
        SELECT f.id AS frame_id, f.night, f.band, f.frame_number, f.kind, f.target,
               f.state, f.reason, f.path AS raw_path, f.output, f.calib_version,
               datetime(f.first_seen, 'unixepoch') AS first_seen_utc,
               datetime(f.updated, 'unixepoch') AS updated_utc,
               datetime(f.done_at, 'unixepoch') AS done_utc
        FROM frames f
        """
    )
    # The flag bits, so that a reader of the file alone can decode them
    # (rows written from photd.flags.FLAGS at every open of the writer).
    db.execute(
        """
        CREATE TABLE flags (
            bit      INTEGER PRIMARY KEY,
            name     TEXT NOT NULL,
            meaning  TEXT NOT NULL
        )
        """
    )
    # Where each target is measured, decided once per night with its evidence
    # (photd.targets): the position, where it came from, and how the first
    # solved frame's detections confirmed it.
    db.execute(
        """
        CREATE TABLE targets (
            night             TEXT NOT NULL,
            target            TEXT NOT NULL,
            ra_deg            REAL NOT NULL,
            dec_deg           REAL NOT NULL,
            source            TEXT NOT NULL,
            catalog_id        TEXT,
            prior_ra_deg      REAL,
            prior_dec_deg     REAL,
            status            TEXT NOT NULL,
            offset_arcsec     REAL,
            runner_up_arcsec  REAL,
            frame_id          INTEGER,
            decided           REAL NOT NULL,
            PRIMARY KEY (night, target)
        )
        """
    )


#: Migrations in order; number i (0-based) takes ``user_version`` from i to
#: i + 1. Append only: never edit or reorder a released migration.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _migrate_v1_initial_schema,
    _migrate_v2_stale_lightcurves,
    _migrate_v3_views_flags_targets,
]


# --------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------


def _to_sql(table: str, column: str, value: Any) -> Any:
    """Turn a Python value into something sqlite3 binds as intended."""
    if value is None:
        return None
    if column in JSON_COLUMNS.get(table, ()) and not isinstance(value, str):
        # ensure_ascii=False keeps non-ASCII target names readable in the file
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    if isinstance(value, Path):
        return str(value)
    # numpy scalars: float64 is a float subclass, but float32 and int64 are
    # not and sqlite3 refuses to bind them. Checked by module name so the
    # store does not import numpy.
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return value.item()
    return value


def _json_default(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} as JSON: {value!r}")


def _from_sql(table: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """Decode the JSON columns of one row read from ``table``."""
    out = dict(row)
    for column in JSON_COLUMNS.get(table, ()):
        text = out.get(column)
        if isinstance(text, str):
            out[column] = json.loads(text)
    return out


def _check_night(night: str) -> str:
    try:
        dt.date.fromisoformat(night)
    except (TypeError, ValueError):
        raise ValueError(f"night must be 'YYYY-MM-DD', got {night!r}") from None
    return night


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


class Store:
    """photd's SQLite store (see the module docstring).

    Use :meth:`open` in the daemon (the one writer) and
    :meth:`open_readonly` in every reading command. A ``Store`` is a context
    manager that closes its connection.

    Parameters
    ----------
    conn : sqlite3.Connection
        A connection opened with ``isolation_level=None`` (transactions are
        begun and ended explicitly by :meth:`transaction`).
    path : pathlib.Path
        The database file, for messages.
    readonly : bool
        True for a reader: write methods raise :class:`StoreError`.
    clock : callable, optional
        Returns Unix seconds; ``time.time`` by default (tests may pin it).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        *,
        readonly: bool,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.conn = conn
        self.path = path
        self.readonly = readonly
        self.clock = clock
        # No plugins: a stray sqlite-utils plugin in the venv must not touch
        # the journal connection.
        self.db = sqlite_utils.Database(conn, execute_plugins=False)
        self._depth = 0  # nesting level of transaction()/snapshot()
        self._columns: dict[str, tuple[str, ...]] = {}

    # ---- opening and closing ---------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.time,
             backups: Sequence[str | os.PathLike[str]] = ()) -> Store:
        """Open (creating if needed) the store for writing, check it and migrate it.

        Parameters
        ----------
        path : path-like
            Database file; its parent folder is created if missing.
        clock : callable, optional
            Source of Unix seconds for ``first_seen``/``updated``/``created``.
        backups : sequence of path-like, optional
            The backups of this store, newest first: a damaged store's error
            names the good ones.

        Returns
        -------
        Store
            The writer's store, schema at the newest version.

        Raises
        ------
        StoreDamaged
            If an existing file fails ``PRAGMA quick_check``.
        StoreError
            If the file is not an SQLite database, WAL mode cannot be enabled
            or the file was written by a newer photd (schema version above
            this code's).
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        existed = path.is_file() and path.stat().st_size > 0
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            store = cls(conn, path, readonly=False, clock=clock)
            if existed:
                # A damaged file must be noticed before anything writes to it (or
                # backs it up over the last good copy).
                problem = store.quick_check()
                if problem != "ok":
                    raise StoreDamaged(path, problem,
                                       [Path(b) for b in backups if check_file(b) == "ok"])
            store._configure_writer()
            store._migrate()
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as exc:
            conn.close()
            if existed and exc.sqlite_errorcode in (sqlite3.SQLITE_CORRUPT,
                                                    sqlite3.SQLITE_NOTADB):
                raise StoreDamaged(path, str(exc),
                                   [Path(b) for b in backups if check_file(b) == "ok"]) from exc
            raise StoreError(f"{path}: cannot open as a photd store: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return store

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing store for reading only.

        Safe while the daemon is writing: in WAL mode a reader sees the last
        committed state and neither waits for nor delays the writer. The
        file is never created.

        Parameters
        ----------
        path : path-like
            Database file written by :meth:`open`.

        Raises
        ------
        FileNotFoundError
            If there is no store at ``path``.
        StoreError
            If the file is not a photd store, or is newer than this code.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no photd store at {path}")
        # mode=ro in a URI: SQLite refuses every write and never creates the
        # file. as_uri() percent-encodes '?', '#' and spaces in the path.
        uri = path.resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            store = cls(conn, path, readonly=True)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
            version = store.schema_version()
            if version == 0:
                raise StoreError(f"{path} is not a photd store (schema version 0)")
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"{path} has schema version {version}; this photd knows "
                    f"up to {len(MIGRATIONS)}: upgrade photd"
                )
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreError(f"{path}: cannot open as a photd store: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return store

    def _configure_writer(self) -> None:
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            # e.g. a network file system without shared memory: readers
            # would then block the writer, which the daemon must not allow.
            raise StoreError(f"{self.path}: cannot enable WAL mode (got {mode!r})")
        # NORMAL in WAL mode: a commit survives a crash of the process
        # (kill -9) because it is in the WAL file; only an OS crash or power
        # loss can drop the last few commits, and never corrupts the file.
        # Losing a last transition is harmless (the frame is re-processed and
        # re-processing replaces), so the fsync per transition of FULL is not
        # worth it on a disk shared with the cameras.
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_MS)}")
        self.conn.execute("PRAGMA foreign_keys = ON")

    def _migrate(self) -> None:
        for number, migration in enumerate(MIGRATIONS):
            with self.transaction():
                # Read inside the write transaction: the version cannot move
                # under us, so no migration ever runs twice.
                version = self.schema_version()
                if version > len(MIGRATIONS):
                    raise StoreError(
                        f"{self.path} has schema version {version}; this photd "
                        f"knows up to {len(MIGRATIONS)}: upgrade photd"
                    )
                if version != number:
                    continue
                migration(self.db)
                # PRAGMA takes no parameters; the value is our own integer.
                self.conn.execute(f"PRAGMA user_version = {int(number + 1)}")
        self._columns.clear()
        with self.transaction():
            self.conn.execute("DELETE FROM flags")
            self.conn.executemany("INSERT INTO flags (bit, name, meaning) VALUES (?, ?, ?)",
                                  [(bit, name, meaning)
                                   for bit, (name, meaning) in sorted(FLAGS.items())])

    def close(self) -> None:
        """Close the connection (an open transaction is rolled back)."""
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def schema_version(self) -> int:
        """Return the number of migrations applied (``PRAGMA user_version``)."""
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    # ---- transactions ------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Store]:
        """Run a block as one write transaction (``BEGIN IMMEDIATE`` … ``COMMIT``).

        On an exception the block is rolled back and the exception re-raised.
        ``BEGIN IMMEDIATE`` takes the write lock at the start, so a write
        never fails half way with SQLITE_BUSY.

        A nested ``transaction()`` does not commit on its own; it joins the
        outer one through a SAVEPOINT, so an inner block that raises undoes
        only its own writes even if the caller catches the exception.
        """
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        if self._depth:
            # The name is built from our own counter, never from input.
            name = f"photd_{self._depth}"
            self.conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self.conn.execute(f"ROLLBACK TO {name}")
                self.conn.execute(f"RELEASE {name}")
                raise
            else:
                self.conn.execute(f"RELEASE {name}")
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        else:
            try:
                self.conn.execute("COMMIT")
            except BaseException:
                # A COMMIT refused (disk full, a lock held past the busy timeout)
                # leaves the transaction open: end it, or every later BEGIN fails.
                if self.conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self.conn.execute("ROLLBACK")
                raise
        finally:
            self._depth = 0

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[Store]:
        """Read several queries from one consistent snapshot.

        A deferred read transaction: in WAL mode it takes no lock that the
        writer waits for. Inside :meth:`transaction` it is a no-op.
        """
        if self._depth or self.conn.in_transaction:
            yield self
            return
        self.conn.execute("BEGIN DEFERRED")
        self._depth = 1
        try:
            yield self
        finally:
            self._depth = 0
            if self.conn.in_transaction:
                self.conn.execute("COMMIT")

    # ---- helpers -----------------------------------------------------------

    def columns(self, table: str) -> tuple[str, ...]:
        """Return the column names of ``table`` as the database has them now."""
        if table not in self._columns:
            cols = tuple(self.db[table].columns_dict)
            if not cols:
                raise StoreError(f"{self.path}: no table {table!r}")
            self._columns[table] = cols
        return self._columns[table]

    def _check_columns(self, table: str, keys: Iterable[str], what: str) -> None:
        known = set(self.columns(table))
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(
                f"{what}: unknown {table} column(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )

    def _insert_rows(self, table: str, rows: Sequence[Mapping[str, Any]], what: str) -> None:
        if not rows:
            return
        keys: set[str] = set()
        for row in rows:
            keys.update(row)
        self._check_columns(table, keys, what)
        encoded = [{k: _to_sql(table, k, v) for k, v in row.items()} for row in rows]
        # alter=False: a typo must fail (checked above), never add a column.
        self.db[table].insert_all(encoded, alter=False)

    def _query(self, table: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [_from_sql(table, row) for row in self.db.query(sql, params)]

    def _ensure_night(self, night: str | None) -> None:
        if night is None:
            return
        _check_night(night)
        self.db.execute(
            "INSERT OR IGNORE INTO nights (night, first_seen) VALUES (?, ?)",
            [night, self.clock()],
        )

    def _require_frame(self, frame_id: int) -> dict[str, Any]:
        rows = self._query("frames", "SELECT * FROM frames WHERE id = ?", [frame_id])
        if not rows:
            raise UnknownFrameError(f"no frame with id {frame_id} in {self.path}")
        return rows[0]

    def _log_state(self, frame_id: int, ts: float, state: str, reason: str | None) -> None:
        self.db.execute(
            "INSERT INTO state_log (frame_id, ts, state, reason) VALUES (?, ?, ?, ?)",
            [frame_id, ts, state, reason],
        )

    def _delete_results(self, frame_id: int, *, solution: bool) -> None:
        for table in ("measurements", "lightcurve", "zeropoints") + (
            ("solutions",) if solution else ()
        ):
            self.db.execute(f"DELETE FROM {table} WHERE frame_id = ?", [frame_id])

    # ---- frames ------------------------------------------------------------

    def upsert_frame(
        self,
        path: str | os.PathLike[str],
        *,
        size: int,
        mtime: float,
        sha256: str,
        band: str | None,
        frame_number: int | None,
        night: str | None,
        closed_at: float | None,
    ) -> tuple[int, bool]:
        """Record a complete raw frame as the watcher found it.

        Parameters
        ----------
        path : path-like
            The raw file's path (the frame's identity).
        size, mtime, sha256 : int, float, str
            File size in bytes, modification time (Unix s), content hash.
        band, frame_number, night : str, int, str or None
            Band letter, frame number counted by the log, night 'YYYY-MM-DD'.
        closed_at : float or None
            When the watcher saw the file closed (Unix s).

        Returns
        -------
        frame_id : int
        changed : bool
            True if the frame is new or its content (sha256) differs from the
            stored one. A changed frame goes back to ``arrived``, loses what
            was derived from the old content (kind, target, log match,
            output, calibration version, timings) and its measurements,
            light-curve rows, zero point and solution, all in the same
            transaction. An unchanged frame keeps its state; only a new
            size/mtime/closed_at is recorded.
        """
        path = str(path)
        values = {
            "size": size,
            "mtime": mtime,
            "sha256": sha256,
            "band": band,
            "frame_number": frame_number,
            "night": night,
            "closed_at": closed_at,
        }
        with self.transaction():
            now = self.clock()
            self._ensure_night(night)
            rows = self._query("frames", "SELECT * FROM frames WHERE path = ?", [path])
            if not rows:
                cursor = self.db.execute(
                    "INSERT INTO frames (path, size, mtime, sha256, band, frame_number,"
                    " night, closed_at, state, attempts, first_seen, updated)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'arrived', 0, ?, ?)",
                    [path, size, mtime, sha256, band, frame_number, night, closed_at, now, now],
                )
                frame_id = int(cursor.lastrowid)
                self._log_state(frame_id, now, "arrived", None)
                return frame_id, True
            old = rows[0]
            frame_id = int(old["id"])
            if old["sha256"] == sha256:
                touched = {
                    k: values[k] for k in ("size", "mtime", "closed_at") if old[k] != values[k]
                }
                if touched:
                    self.db["frames"].update(frame_id, touched)
                return frame_id, False
            reset = dict.fromkeys(
                (
                    "kind",
                    "target",
                    "log_source",
                    "log_line",
                    "log_fingerprint",
                    "reason",
                    "output",
                    "calib_version",
                    "timings",
                    "done_at",
                ),
            )
            reset.update(values, state="arrived", attempts=0, updated=now)
            self.db["frames"].update(frame_id, reset)
            self._delete_results(frame_id, solution=True)
            reason = "content changed (sha256 differs)"
            self._log_state(frame_id, now, "arrived", reason)
            return frame_id, True

    def set_state(
        self, frame_id: int, state: str, reason: str | None = None, **fields: Any
    ) -> None:
        """Move a frame to ``state`` in one committed transaction.

        Parameters
        ----------
        frame_id : int
        state : str
            One of :data:`STATES`.
        reason : str or None
            Why (machine-readable first word, e.g. ``"too_few_matches: 3 < 6"``);
            stored as given, cleared when None.
        **fields
            Any other ``frames`` column to set at the same time (``kind``,
            ``target``, ``output``, ``calib_version``, ``timings`` as a dict,
            ...). ``updated`` is set to now; ``done_at`` to now when the state
            becomes ``done``; ``attempts`` goes up by one on entering
            ``processing``, unless given.

        Raises
        ------
        ValueError
            Unknown state or unknown column (named in the message).
        UnknownFrameError
            No such frame.
        """
        if state not in STATES:
            raise ValueError(f"unknown frame state {state!r}; known: {', '.join(STATES)}")
        if "id" in fields or "path" in fields:
            raise ValueError("set_state cannot change a frame's id or path")
        self._check_columns("frames", fields, "set_state")
        with self.transaction():
            old = self._require_frame(frame_id)
            now = self.clock()
            updates = {k: _to_sql("frames", k, v) for k, v in fields.items()}
            updates.update(state=state, reason=reason)
            updates.setdefault("updated", now)
            if state == "done":
                updates.setdefault("done_at", now)
            if state == "processing" and old["state"] != "processing":
                updates.setdefault("attempts", (old["attempts"] or 0) + 1)
            self.db["frames"].update(frame_id, updates)
            self._log_state(frame_id, now, state, reason)

    def drop_results(self, frame_id: int) -> None:
        """Remove a frame's measurements, light-curve rows, zero point and solution."""
        with self.transaction():
            self._delete_results(frame_id, solution=True)

    def update_frame(self, frame_id: int, **fields: Any) -> None:
        """Set ``frames`` columns without a state transition (no state_log row)."""
        if not fields:
            return
        for key in ("id", "path", "state"):
            if key in fields:
                raise ValueError(f"update_frame cannot set {key!r}; use set_state/upsert_frame")
        self._check_columns("frames", fields, "update_frame")
        with self.transaction():
            self._require_frame(frame_id)
            updates = {k: _to_sql("frames", k, v) for k, v in fields.items()}
            updates.setdefault("updated", self.clock())
            self.db["frames"].update(frame_id, updates)

    def frame(self, frame_id: int) -> dict[str, Any] | None:
        """Return one frame row (JSON columns decoded), or None."""
        rows = self._query("frames", "SELECT * FROM frames WHERE id = ?", [frame_id])
        return rows[0] if rows else None

    def frame_by_path(self, path: str | os.PathLike[str]) -> dict[str, Any] | None:
        """Return the frame recorded for raw file ``path``, or None."""
        rows = self._query("frames", "SELECT * FROM frames WHERE path = ?", [str(path)])
        return rows[0] if rows else None

    def frames(
        self,
        states: Iterable[str] | None = None,
        band: str | None = None,
        night: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return frames filtered by state(s), band and night.

        Ordered by band, frame number, path (the order of ``status --json``).
        """
        where: list[str] = []
        params: list[Any] = []
        if states is not None:
            states = [states] if isinstance(states, str) else list(states)
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if band is not None:
            where.append("band = ?")
            params.append(band)
        if night is not None:
            where.append("night = ?")
            params.append(night)
        sql = "SELECT * FROM frames"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY band, frame_number, path"
        return self._query("frames", sql, params)

    def unfinished(self) -> list[dict[str, Any]]:
        """Return frames not in a terminal state, oldest first (resume order)."""
        terminal = sorted(TERMINAL_STATES)
        return self._query(
            "frames",
            f"SELECT * FROM frames WHERE state NOT IN ({', '.join('?' * len(terminal))})"
            " ORDER BY id",
            terminal,
        )

    def counts(self) -> dict[str, int]:
        """Return ``{state: number of frames}`` for the states present."""
        rows = self.db.query(
            "SELECT state, count(*) AS n FROM frames GROUP BY state ORDER BY state"
        )
        return {row["state"]: int(row["n"]) for row in rows}

    def state_history(self, frame_id: int) -> list[dict[str, Any]]:
        """Return a frame's transitions (ts, state, reason), oldest first."""
        return self._query(
            "state_log",
            "SELECT ts, state, reason FROM state_log WHERE frame_id = ? ORDER BY id",
            [frame_id],
        )

    # ---- results of one frame ----------------------------------------------

    def _frame_rows(
        self,
        table: str,
        frame: Mapping[str, Any],
        rows: Iterable[Mapping[str, Any]],
        defaults: Mapping[str, Any],
        what: str,
    ) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            row = dict(row)
            if row.setdefault("frame_id", frame["id"]) != frame["id"]:
                raise ValueError(
                    f"{what}: row for frame {row['frame_id']} given for frame {frame['id']}"
                )
            for key, value in defaults.items():
                if row.get(key) is None:
                    row[key] = value
            out.append(row)
        return out

    def replace_measurements(self, frame_id: int, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace all measurements of one frame (delete + insert, one transaction).

        Parameters
        ----------
        frame_id : int
        rows : iterable of dict
            One per star: keys are ``measurements`` columns (``star_id``
            required). ``frame_id`` is filled in; ``target``, ``band`` and
            ``calib_version`` default to the frame's. NaN is stored as NULL.

        Raises
        ------
        ValueError
            A key that is not a column (all unknown keys are named).
        """
        with self.transaction():
            frame = self._require_frame(frame_id)
            self.db.execute("DELETE FROM measurements WHERE frame_id = ?", [frame_id])
            self._insert_measurements(frame, rows)

    def _insert_measurements(
        self, frame: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]
    ) -> None:
        defaults = {
            "target": frame["target"],
            "band": frame["band"],
            "calib_version": frame["calib_version"],
        }
        prepared = self._frame_rows("measurements", frame, rows, defaults, "measurements")
        self._insert_rows("measurements", prepared, "measurements")

    def finish_frame(
        self,
        frame_id: int,
        *,
        measurements: Iterable[Mapping[str, Any]],
        lightcurve_rows: Iterable[Mapping[str, Any]] = (),
        zeropoint: Mapping[str, Any] | None = None,
        solution: Mapping[str, Any] | None = None,
        state: str = "done",
        reason: str | None = None,
        **fields: Any,
    ) -> None:
        """Store a frame's results and its final state in ONE transaction.

        The frame's old measurements, light-curve rows and zero point are
        deleted first, so processing a frame again replaces its results and
        never duplicates them. A crash before the commit leaves the old
        results and the old state.

        Parameters
        ----------
        frame_id : int
        measurements : iterable of dict
            As for :meth:`replace_measurements` (may be empty).
        lightcurve_rows : iterable of dict
            ``lightcurve`` rows of this frame (``target``/``band`` default
            to the frame's).
        zeropoint : dict or None
            ``zeropoints`` columns; None leaves the frame without one.
        solution : dict or None
            ``solutions`` columns; replaces the stored solution. None keeps
            the solution stored by :meth:`record_solution` for this run.
        state, reason, **fields
            As for :meth:`set_state`. To end a re-processed frame without
            results (``badfit``), call this with ``measurements=()`` so the
            earlier run's rows go too.
        """
        with self.transaction():
            frame = self._require_frame(frame_id)
            self._delete_results(frame_id, solution=solution is not None)
            # The frame's target/band as they will be after this call.
            frame = {**frame, **fields}
            self._insert_measurements(frame, measurements)
            lc_defaults = {"target": frame["target"], "band": frame["band"]}
            self._insert_rows(
                "lightcurve",
                self._frame_rows("lightcurve", frame, lightcurve_rows, lc_defaults, "lightcurve"),
                "lightcurve",
            )
            if zeropoint is not None:
                self._insert_rows(
                    "zeropoints",
                    self._frame_rows("zeropoints", frame, [zeropoint], {}, "zeropoint"),
                    "zeropoint",
                )
            if solution is not None:
                self.record_solution(frame_id, solution)
            self.set_state(frame_id, state, reason, **fields)

    def record_solution(self, frame_id: int, solution: Mapping[str, Any]) -> None:
        """Store (replace) a frame's astrometric solution.

        Parameters
        ----------
        frame_id : int
        solution : dict
            ``solutions`` columns: ``n_sources``, ``n_matches``,
            ``rms_arcsec``, ``scale_arcsec``, ``rotation_deg``, ``fwhm_px``,
            ``relative`` (bool), ``header`` (dict of WCS cards, stored as JSON).
        """
        with self.transaction():
            frame = self._require_frame(frame_id)
            row = self._frame_rows("solutions", frame, [solution], {}, "solution")[0]
            row.setdefault("created", self.clock())
            self.db.execute("DELETE FROM solutions WHERE frame_id = ?", [frame_id])
            self._insert_rows("solutions", [row], "solution")

    def solution(self, frame_id: int) -> dict[str, Any] | None:
        """Return a frame's stored solution (header decoded), or None."""
        rows = self._query("solutions", "SELECT * FROM solutions WHERE frame_id = ?", [frame_id])
        return rows[0] if rows else None

    def zeropoint(self, frame_id: int) -> dict[str, Any] | None:
        """Return a frame's zero point row, or None."""
        rows = self._query("zeropoints", "SELECT * FROM zeropoints WHERE frame_id = ?", [frame_id])
        return rows[0] if rows else None

    # ---- calibrations and detector parameters ------------------------------

    def record_calibration(
        self,
        night: str,
        band: str,
        kind: str,
        *,
        path: str | os.PathLike[str],
        inputs: Sequence[str | os.PathLike[str]],
        final: bool = False,
    ) -> int:
        """Record a new master calibration and return its version number.

        Versions count from 1 per (night, band, kind). Recording a ``final``
        master clears ``final`` on the earlier versions, so there is at most
        one final master per night/band/kind.
        """
        _check_night(night)
        with self.transaction():
            self._ensure_night(night)
            row = self.db.execute(
                "SELECT coalesce(max(version), 0) FROM calibrations"
                " WHERE night = ? AND band = ? AND kind = ?",
                [night, band, kind],
            ).fetchone()
            version = int(row[0]) + 1
            if final:
                self.db.execute(
                    "UPDATE calibrations SET final = 0 WHERE night = ? AND band = ? AND kind = ?",
                    [night, band, kind],
                )
            inputs = [str(p) for p in inputs]
            self._insert_rows(
                "calibrations",
                [
                    {
                        "night": night,
                        "band": band,
                        "kind": kind,
                        "version": version,
                        "path": str(path),
                        "n_inputs": len(inputs),
                        "inputs": inputs,
                        "created": self.clock(),
                        "final": int(bool(final)),
                    }
                ],
                "calibration",
            )
            return version

    def latest_calibration(self, night: str, band: str, kind: str) -> dict[str, Any] | None:
        """Return the newest master of this night/band/kind, or None."""
        rows = self._query(
            "calibrations",
            "SELECT * FROM calibrations WHERE night = ? AND band = ? AND kind = ?"
            " ORDER BY version DESC LIMIT 1",
            [night, band, kind],
        )
        return rows[0] if rows else None

    def calibration_before(
        self, night: str, band: str, kind: str, max_age_days: float
    ) -> dict[str, Any] | None:
        """Return the fallback master from the nearest earlier night.

        Looks at nights strictly before ``night`` and at most
        ``max_age_days`` earlier; on the most recent such night, the final
        master if there is one, else its latest version. None if none.
        """
        oldest = dt.date.fromisoformat(_check_night(night)) - dt.timedelta(days=max_age_days)
        rows = self._query(
            "calibrations",
            "SELECT * FROM calibrations WHERE band = ? AND kind = ?"
            " AND night < ? AND night >= ?"
            " ORDER BY night DESC, final DESC, version DESC LIMIT 1",
            [band, kind, night, oldest.isoformat()],
        )
        return rows[0] if rows else None

    def set_detector_params(
        self,
        night: str,
        band: str,
        *,
        gain_e_per_adu: float,
        rdnoise_e: float,
        gain_err: float | None = None,
        rdnoise_err: float | None = None,
        inputs: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        """Store (replace) the measured gain and read noise of a night/band."""
        _check_night(night)
        with self.transaction():
            self._ensure_night(night)
            self.db.execute(
                "DELETE FROM detector_params WHERE night = ? AND band = ?", [night, band]
            )
            self._insert_rows(
                "detector_params",
                [
                    {
                        "night": night,
                        "band": band,
                        "gain_e_per_adu": gain_e_per_adu,
                        "rdnoise_e": rdnoise_e,
                        "gain_err": gain_err,
                        "rdnoise_err": rdnoise_err,
                        "inputs": [str(p) for p in inputs],
                        "created": self.clock(),
                    }
                ],
                "detector_params",
            )

    def detector_params(self, night: str, band: str) -> dict[str, Any] | None:
        """Return the gain/read-noise row of a night/band, or None."""
        rows = self._query(
            "detector_params",
            "SELECT * FROM detector_params WHERE night = ? AND band = ?",
            [night, band],
        )
        return rows[0] if rows else None

    def nights(self) -> list[dict[str, Any]]:
        """Return every night seen, oldest first."""
        return self._query("nights", "SELECT * FROM nights ORDER BY night")

    # ---- light curves and measurements --------------------------------------

    def replace_lightcurve(
        self,
        target: str,
        band: str,
        rows: Iterable[Mapping[str, Any]],
        ensemble_version: int,
    ) -> None:
        """Replace the whole differential light curve of a target in a band.

        Parameters
        ----------
        target, band : str
        rows : iterable of dict
            ``lightcurve`` columns, ``frame_id`` required; ``target`` and
            ``band`` are filled in (a row naming another target or band is
            an error).
        ensemble_version : int
            Stored on every row: which comparison ensemble produced them.
        """
        prepared = []
        for row in rows:
            row = dict(row)
            for key, value in (("target", target), ("band", band)):
                if row.setdefault(key, value) != value:
                    raise ValueError(
                        f"replace_lightcurve({target!r}, {band!r}): row has {key}={row[key]!r}"
                    )
            if "frame_id" not in row:
                raise ValueError(f"replace_lightcurve({target!r}, {band!r}): row without frame_id")
            row["ensemble_version"] = ensemble_version
            prepared.append(row)
        with self.transaction():
            self.db.execute("DELETE FROM lightcurve WHERE target = ? AND band = ?", [target, band])
            self._insert_rows("lightcurve", prepared, "lightcurve")
            self.db.execute(
                "DELETE FROM stale_lightcurves WHERE target = ? AND band = ?", [target, band]
            )

    def record_target(self, night: str, target: str, **fields: Any) -> bool:
        """Keep where ``target`` is measured on ``night``, unless already decided.

        ``fields``: the columns of the ``targets`` table (``ra_deg``, ``dec_deg``,
        ``source``, ``status``, ...). Returns True if this call decided it.
        """
        self._check_columns("targets", fields, "target decision")
        row = {"night": _check_night(night), "target": target, **fields,
               "decided": self.clock()}
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.transaction():
            cur = self.conn.execute(
                f"INSERT OR IGNORE INTO targets ({cols}) VALUES ({marks})",
                [_to_sql("targets", k, v) for k, v in row.items()])
        return cur.rowcount == 1

    def target_decision(self, night: str, target: str) -> dict[str, Any] | None:
        """Where ``target`` is measured on ``night`` (a ``targets`` row), or None."""
        rows = self._query("targets", "SELECT * FROM targets WHERE night = ? AND target = ?",
                           (night, target))
        return rows[0] if rows else None

    def forget_target(self, night: str, target: str) -> None:
        """Drop a night's decision (its frames are measured again from scratch)."""
        with self.transaction():
            self.conn.execute("DELETE FROM targets WHERE night = ? AND target = ?",
                              (night, target))

    def mark_lightcurve_stale(self, target: str, band: str) -> None:
        """Record that a target's curve in a band must be derived again.

        Write it in the same transaction as the measurements that make the
        curve stale; :meth:`replace_lightcurve` clears it.
        """
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO stale_lightcurves (target, band, since) VALUES (?, ?, ?)",
                [target, band, time.time()],
            )

    def stale_lightcurves(self) -> list[tuple[str, str]]:
        """(target, band) of every curve marked stale, oldest mark first."""
        rows = self.conn.execute(
            "SELECT target, band FROM stale_lightcurves ORDER BY since, target, band"
        ).fetchall()
        return [(str(t), str(b)) for t, b in rows]

    def lightcurve(self, target: str, band: str | None = None) -> list[dict[str, Any]]:
        """Return a target's light-curve rows ordered by MJD.

        Each row also carries the frame's ``frame_number`` and raw ``path``.
        """
        sql = (
            "SELECT lightcurve.*, frames.frame_number AS frame_number, frames.path AS path"
            " FROM lightcurve JOIN frames ON frames.id = lightcurve.frame_id"
            " WHERE lightcurve.target = ?"
        )
        params: list[Any] = [target]
        if band is not None:
            sql += " AND lightcurve.band = ?"
            params.append(band)
        sql += " ORDER BY lightcurve.mjd, lightcurve.band, lightcurve.frame_id"
        return self._query("lightcurve", sql, params)

    def measurements_for(
        self,
        star_id: str | None = None,
        target: str | None = None,
        band: str | None = None,
    ) -> list[dict[str, Any]]:
        """Return measurements filtered by star, target and band, by time."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("star_id", star_id), ("target", target), ("band", band)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        sql = "SELECT * FROM measurements"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY mjd_mid, frame_id, star_id"
        return self._query("measurements", sql, params)

    # ---- maintenance -------------------------------------------------------

    def backup(self, dest_path: str | os.PathLike[str]) -> Path:
        """Write a checked copy of the store to ``dest_path`` while running; rotate older ones.

        Uses SQLite's online backup into a temporary file in the destination
        folder, runs ``PRAGMA quick_check`` on the copy, flushes it, then
        shifts the previous backups down (``.bak`` -> ``.bak.1`` -> ...,
        :data:`BACKUPS_KEPT` in all) and renames the copy into place. A copy
        that fails the check replaces nothing: a damaged store never destroys
        the last good backup.

        Returns
        -------
        pathlib.Path
            ``dest_path``.

        Raises
        ------
        StoreDamaged
            If the copy (hence the store) fails the check.
        StoreError
            If the destination folder is a symbolic link.
        """
        if self.conn.in_transaction:
            raise StoreError("backup() cannot run inside a transaction")
        dest = Path(dest_path)
        if dest.parent.is_symlink():
            # A link planted in the work folder must not make photd write elsewhere.
            raise StoreError(f"{dest.parent} is a symbolic link: no backup written through it")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            target = sqlite3.connect(tmp, isolation_level=None)
            try:
                self.conn.backup(target)
                # A self-contained file: no -wal/-shm beside the renamed copy.
                target.execute("PRAGMA journal_mode = DELETE")
                problem = "ok"
            except sqlite3.DatabaseError as exc:
                if exc.sqlite_errorcode not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                    raise
                problem = str(exc)
            finally:
                target.close()
            if problem == "ok":
                problem = check_file(tmp)
            if problem != "ok":
                raise StoreDamaged(self.path, problem,
                                   [b for b in backup_generations(dest) if b.exists()])
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            generations = backup_generations(dest)
            for older, newer in zip(generations[:0:-1], generations[-2::-1], strict=True):
                if newer.exists():
                    os.replace(newer, older)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):
            dirfd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)
        return dest

    def quick_check(self) -> str:
        """Run ``PRAGMA quick_check`` (seconds on a large store); ``'ok'`` or the problems."""
        rows = self.conn.execute("PRAGMA quick_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def integrity_check(self) -> str:
        """Run ``PRAGMA integrity_check``; return ``'ok'`` or the problems found."""
        rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Copy the WAL into the database file (``PRAGMA wal_checkpoint``).

        Parameters
        ----------
        mode : {'PASSIVE', 'FULL', 'RESTART', 'TRUNCATE'}
            PASSIVE never waits for readers; TRUNCATE also empties the WAL
            file (e.g. at the end of a night).

        Returns
        -------
        (busy, wal_pages, checkpointed_pages) : tuple of int
        """
        mode = mode.upper()
        if mode not in _CHECKPOINT_MODES:
            raise ValueError(f"checkpoint mode {mode!r} not in {_CHECKPOINT_MODES}")
        busy, log, done = self.conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(busy), int(log), int(done)

    # ---- the status contract -------------------------------------------------

    def status_json(self) -> dict[str, Any]:
        """Return ``photd status --json`` (a DESIGN.md **contract**).

        ``{"counts": {STATE: COUNT, ...}, "frames": [{"path": RAW_PATH,
        "band": B, "state": STATE, "reason": TEXT_OR_NULL, "output":
        PROCESSED_PATH_OR_NULL}, ...]}``; ``counts`` lists the states that
        occur; frames are ordered by band, frame number, then path. Counts and
        frames come from one snapshot, so they always agree.
        """
        with self.snapshot():
            counts = self.counts()
            frames = [
                {
                    "path": row["path"],
                    "band": row["band"],
                    "state": row["state"],
                    "reason": row["reason"],
                    "output": row["output"],
                }
                for row in self.db.query(
                    "SELECT path, band, state, reason, output FROM frames"
                    " ORDER BY band, frame_number, path"
                )
            ]
        return {"counts": counts, "frames": frames}
