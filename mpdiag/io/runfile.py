"""Run files: what a diagnosis records, on disk as it goes, in an SQLite database (standard library).

``diagnose(..., run_file="run.mpdiag")`` writes each recorded step in one transaction, committed when
the step closes, in WAL mode: a reader can load the file while training writes it, and a process
killed mid-run leaves a file holding every step committed before the kill. ``mpdiag.load(path)``
returns the same ``mpdiag.core.run.Run`` that ``diag.run`` gives.

Nothing in a run file is executed on load: rows hold numbers, text, JSON and raw little-endian integer
arrays (no pickle). Histograms keep only the span of non-empty bins, with the narrowest integer type
that holds their counts, compressed with zlib.

Examples:
    >>> import tempfile, os, torch, mpdiag
    >>> path = os.path.join(tempfile.mkdtemp(), "run.mpdiag")
    >>> model = torch.nn.Linear(4, 2)
    >>> with mpdiag.diagnose(model, run_file=path) as diag:
    ...     model(torch.randn(3, 4)).sum().backward()
    ...     diag.step()
    >>> mpdiag.load(path).stats("", "activation") == diag.run.stats("", "activation")
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mpdiag.core.errors import MpdiagError
from mpdiag.core.events import AnomalyRecord, NonFiniteEvent
from mpdiag.core.run import Kind, Run, Site
from mpdiag.core.stats import STATS, Stat, Storage, TensorStats
from mpdiag.core.updates import UpdateStats

__all__ = ["load", "RunWriter", "RunFileSink", "RunFileError", "SCHEMA_VERSION", "refuse_existing"]

# 2: events name the ranks they appeared on (torch.distributed). 3: the stats table's columns follow the
# statistics' declarations and are read by name, so that a statistic added later needs no new version
# (older files read it as empty, older readers ignore its column); readers of 2 read by position.
# The updates table (what each optimizer step did to each parameter, as JSON) came later within 3: a
# file without it reads as having recorded no updates, and older readers ignore it.
SCHEMA_VERSION = 3
_APPLICATION_ID = 0x6D706467  # "mpdg": marks the SQLite file as an mpdiag run file

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sites (id INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, UNIQUE (name, kind));
CREATE TABLE steps (step INTEGER PRIMARY KEY, loss_scale REAL);
CREATE TABLE stats (
    step INTEGER NOT NULL, site INTEGER NOT NULL REFERENCES sites (id), {stat_columns},
    PRIMARY KEY (step, site));
CREATE TABLE events (step INTEGER, seq INTEGER, name TEXT, kind TEXT, phase TEXT,
                     nans INTEGER, posinf INTEGER, neginf INTEGER, produced INTEGER, ranks TEXT);
CREATE TABLE anomalies (id INTEGER PRIMARY KEY, step INTEGER, message TEXT, traceback TEXT, module TEXT, node TEXT);
CREATE TABLE updates (step INTEGER NOT NULL, param TEXT NOT NULL, stats TEXT NOT NULL, PRIMARY KEY (step, param));
"""


class RunFileError(MpdiagError):
    """A run file that cannot be written or read; the message says which and why."""


def refuse_existing(path: str | os.PathLike[str]) -> None:
    """A run file is always a new file: refuse a path that exists (a trainer callback checks when it is
    made, the writer when it opens)."""
    if Path(path).exists():
        raise RunFileError(f"run file {path} already exists; choose a new path or delete it first")


class RunWriter:
    """Appends recorded steps to a run file, one committed transaction per step."""

    def __init__(self, path: str | os.PathLike[str], formats: tuple[str, ...], meta: Mapping[str, Any]) -> None:
        self.path = Path(path)
        refuse_existing(self.path)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # a killed process loses nothing committed
            with self._transaction():
                self.db.execute(f"PRAGMA application_id={_APPLICATION_ID}")
                for statement in filter(str.strip, _schema().split(";")):
                    self.db.execute(statement)  # executescript() would commit our transaction early
                self._put_meta({"schema_version": SCHEMA_VERSION, "formats": list(formats), **meta})
        except (sqlite3.Error, OSError) as err:
            raise RunFileError(
                f"cannot create run file {self.path}: {err}; check the directory exists and is writable"
            ) from err
        self._site_ids: dict[Site, int] = {}

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _put_meta(self, meta: Mapping[str, Any]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v, default=str)) for k, v in meta.items()]
        )

    def _site_id(self, site: Site) -> int:
        if site not in self._site_ids:
            cur = self.db.execute("INSERT INTO sites (name, kind) VALUES (?, ?)", (site.name, site.kind.value))
            assert cur.lastrowid is not None  # set by the INSERT just made
            self._site_ids[site] = cur.lastrowid
        return self._site_ids[site]

    def write_step(
        self,
        step: int,
        stats: Mapping[Site, TensorStats],
        events: tuple[NonFiniteEvent, ...] = (),
        loss_scale: float | None = None,
        meta: Mapping[str, Any] | None = None,
        updates: Mapping[str, UpdateStats] | None = None,
    ) -> None:
        with self._transaction():
            self.db.execute("INSERT INTO steps VALUES (?, ?)", (step, loss_scale))
            self.db.executemany(
                _INSERT_STATS, [(step, self._site_id(site), *_stats_row(s)) for site, s in stats.items()]
            )
            self.db.executemany(
                "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?)",
                [
                    (
                        e.step,
                        e.seq,
                        e.name,
                        e.kind.value,
                        e.phase,
                        e.nans,
                        e.posinf,
                        e.neginf,
                        int(e.produced),
                        ",".join(map(str, e.ranks)),
                    )
                    for e in events
                ],
            )
            self.db.executemany(
                "INSERT INTO updates VALUES (?, ?, ?)",
                [(step, name, json.dumps(u.as_dict())) for name, u in (updates or {}).items()],
            )
            if meta:
                self._put_meta(meta)

    def write_anomaly(self, record: AnomalyRecord) -> None:
        with self._transaction():
            self.db.execute(
                "INSERT INTO anomalies (step, message, traceback, module, node) VALUES (?,?,?,?,?)",
                (record.step, record.message, json.dumps(list(record.traceback)), record.module, record.node),
            )

    def close(self) -> None:
        self.db.close()


class RunFileSink:
    """A recording's sink (``mpdiag.record.sinks.Sink``) that writes a run file: created when the
    recording attaches, one committed transaction per closed step, removed if the attach fails."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._writer: RunWriter | None = None
        self._updates: dict[str, UpdateStats] = {}  # the step's, written in its transaction

    def open(self, formats: tuple[str, ...], meta: Mapping[str, Any]) -> None:
        self._writer = RunWriter(self.path, formats, meta)

    def write_step(
        self,
        step: int,
        stats: Mapping[Site, TensorStats],
        events: tuple[NonFiniteEvent, ...],
        loss_scale: float | None,
        meta: Mapping[str, Any],
    ) -> None:
        updates, self._updates = self._updates, {}
        self._opened().write_step(step, stats, events, loss_scale, meta, updates)

    def write_updates(self, step: int, updates: Mapping[str, UpdateStats]) -> None:
        self._updates = dict(updates)  # the step's write_step follows, and commits them with it

    def write_anomaly(self, record: AnomalyRecord) -> None:
        self._opened().write_anomaly(record)

    def close(self) -> None:
        self._opened().close()

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def _opened(self) -> RunWriter:
        if self._writer is None:
            raise RunFileError(f"run file sink {self.path} was not opened; a recording opens it when it attaches")
        return self._writer


# -- the stats table's columns, derived from the statistics' declarations (mpdiag.core.stats.STATS) ---
def _columns(stat: Stat) -> list[tuple[str, str]]:
    """The (column, SQL type) pairs that store ``stat``."""
    if stat.storage is Storage.SPAN:
        return [(f"{stat.name}_first", "INTEGER"), (stat.name, "BLOB")]
    sql = {Storage.INTEGER: "INTEGER", Storage.REAL: "REAL", Storage.NAMES: "TEXT", Storage.ARRAY: "BLOB"}
    return [(stat.name, sql[stat.storage])]


def _encode(stat: Stat, value: Any) -> tuple[Any, ...]:
    if stat.storage is Storage.REAL:  # SQLite keeps inf; NaN becomes NULL (and files of schema 2 wrote inf so)
        return (None if math.isnan(value) else value,)
    if stat.storage is Storage.NAMES:
        return (",".join(sorted(value)),)
    if stat.storage is Storage.SPAN:  # only the bins from the first non-empty one to the last
        nonzero = np.flatnonzero(value)
        first = int(nonzero[0]) if nonzero.size else 0
        return first, _pack(value[first : int(nonzero[-1]) + 1] if nonzero.size else value[:0])
    if stat.storage is Storage.ARRAY:
        return (_pack(value.reshape(-1)),)
    return (value,)


def _decode(stat: Stat, stored: tuple[Any, ...], default: Any) -> Any:
    """The value ``_encode`` stored; ``default`` (the empty statistics' value) where a column is NULL or
    missing (a file written before the statistic existed)."""
    if stored[-1] is None:
        return default
    if stat.storage is Storage.NAMES:
        return frozenset(filter(None, stored[0].split(",")))
    if stat.storage is Storage.SPAN:
        first, span = stored[0], _unpack(stored[1])
        full = np.zeros(default.shape, dtype=np.int64)
        full[first : first + len(span)] = span
        return full
    if stat.storage is Storage.ARRAY:
        return _unpack(stored[0]).reshape(default.shape)
    return stored[0]


_STAT_COLUMNS = [column for stat in STATS for column in _columns(stat)]
_INSERT_STATS = (
    f"INSERT INTO stats (step, site, {', '.join(c for c, _ in _STAT_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (len(_STAT_COLUMNS) + 2))})"
)


def _schema() -> str:
    return _SCHEMA.format(stat_columns=", ".join(f"{c} {sql}" for c, sql in _STAT_COLUMNS))


def _stats_row(s: TensorStats) -> tuple[Any, ...]:
    return tuple(v for stat in STATS for v in _encode(stat, getattr(s, stat.name)))


def _read_stats(
    db: sqlite3.Connection, formats: tuple[str, ...], sites: Mapping[int, Site]
) -> Iterator[tuple[int, Site, TensorStats]]:
    """Every stored TensorStats, by step and site, in the order they were written."""
    present = {row[1] for row in db.execute("PRAGMA table_info(stats)")}
    columns = [c if c in present else "NULL" for c, _ in _STAT_COLUMNS]
    empty = TensorStats.empty(formats)
    for step, site, *row in db.execute(f"SELECT step, site, {', '.join(columns)} FROM stats ORDER BY step, rowid"):
        values, i = {}, 0
        for stat in STATS:
            width = len(_columns(stat))
            values[stat.name] = _decode(stat, tuple(row[i : i + width]), getattr(empty, stat.name))
            i += width
        yield step, sites[site], TensorStats(formats, **values)


_WIDTHS: tuple[type[np.unsignedinteger[Any]], ...] = (np.uint8, np.uint16, np.uint32, np.uint64)


def _pack(counts: np.ndarray) -> bytes:
    """Counts (non-negative) as zlib-compressed little-endian integers of the narrowest width; 1 byte of width."""
    top = int(counts.max()) if counts.size else 0
    width = next(i for i, t in enumerate(_WIDTHS) if top <= np.iinfo(t).max)
    return bytes([width]) + zlib.compress(counts.astype(np.dtype(_WIDTHS[width]).newbyteorder("<")).tobytes(), 1)


def _unpack(blob: bytes) -> np.ndarray:
    dtype = np.dtype(_WIDTHS[blob[0]]).newbyteorder("<")
    return np.frombuffer(zlib.decompress(blob[1:]), dtype=dtype).astype(np.int64)


def load(path: str | os.PathLike[str]) -> Run:
    """The Run stored in a run file; safe to call while training still writes it.

    Raises:
        RunFileError: not a run file, written by a newer mpdiag, damaged or truncated, or missing.

    Examples:
        >>> import tempfile, pathlib, torch, mpdiag
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.mpdiag"
        >>> model = torch.nn.Linear(3, 3)
        >>> with mpdiag.diagnose(model, run_file=path) as diag:
        ...     model(torch.randn(2, 3)).sum().backward()
        >>> mpdiag.load(path).records == diag.run.records
        True
    """
    path = Path(path)
    if not path.is_file():
        raise RunFileError(f"no run file at {path}")
    if path.stat().st_size == 0:  # SQLite reads an empty file as an empty database
        raise RunFileError(f"{path} is empty (0 bytes), not an mpdiag run file: nothing was ever written to it")
    try:
        db = sqlite3.connect(_read_only_uri(path), uri=True)
        try:
            return _read(db, path)
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        raise RunFileError(
            f"{path} is not a readable mpdiag run file ({err}); it may be damaged, truncated, or another kind of file"
        ) from err


def _read_only_uri(path: Path) -> str:
    """How to open ``path`` for reading and leave nothing beside it.

    A read-only connection to a WAL database creates its ``-wal`` and ``-shm`` files and cannot remove them
    on close. Without a ``-wal`` file beside it, no connection is open on the file (the last one to close
    removes it), so the file is finished and opened as immutable: no locks, no side files. With one, a
    writer may be live (or was killed): read through the WAL, which is already there.
    NB: a finished run file is never written again by mpdiag (RunWriter refuses existing paths); another
    program that opened it for writing in rollback-journal mode would not be seen.
    """
    live = path.with_name(path.name + "-wal").exists()
    return f"{path.resolve().as_uri()}?{'mode=ro' if live else 'immutable=1'}"


def _read(db: sqlite3.Connection, path: Path) -> Run:
    if db.execute("PRAGMA application_id").fetchone()[0] != _APPLICATION_ID:
        raise RunFileError(f"{path} is an SQLite database but not an mpdiag run file")
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise RunFileError(
            f"{path} has run-file schema version {version!r}; this mpdiag reads up to "
            f"{SCHEMA_VERSION}: upgrade mpdiag to read it"
        )
    formats = tuple(meta.pop("formats"))
    meta.pop("schema_version")
    sites = {i: Site(n, Kind(k)) for i, n, k in db.execute("SELECT id, name, kind FROM sites")}
    records: dict[int, dict[Site, TensorStats]] = {}
    scales = {s: float(v) for s, v in db.execute("SELECT step, loss_scale FROM steps") if v is not None}
    for (step,) in db.execute("SELECT step FROM steps ORDER BY step"):
        records[step] = {}
    for step, site, stats in _read_stats(db, formats, sites):
        records.setdefault(step, {})[site] = stats
    events: dict[int, list[NonFiniteEvent]] = {}
    ranks_column = "ranks" if version >= 2 else "''"  # version 1 files predate ranks
    for step, seq, name, kind, phase, n, p, m, produced, ranks in db.execute(
        f"SELECT step, seq, name, kind, phase, nans, posinf, neginf, produced, {ranks_column} FROM events "
        "ORDER BY rowid"
    ):
        events.setdefault(step, []).append(
            NonFiniteEvent(
                step,
                name,
                kind,
                phase,
                n,
                p,
                m,
                seq,
                bool(produced),
                tuple(int(r) for r in (ranks or "").split(",") if r),
            )
        )
    anomalies = tuple(
        AnomalyRecord(message, tuple(json.loads(tb)), module, node, step)
        for step, message, tb, module, node in db.execute(
            "SELECT step, message, traceback, module, node FROM anomalies ORDER BY id"
        )
    )
    return Run(
        formats=formats,
        records=records,
        meta=meta,
        loss_scales=scales,
        events={s: tuple(e) for s, e in events.items()},
        anomalies=anomalies,
        updates=_read_updates(db),
    )


def _read_updates(db: sqlite3.Connection) -> dict[int, dict[str, UpdateStats]]:
    """step -> parameter -> UpdateStats; empty for a file written before updates were stored."""
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'updates'").fetchone() is None:
        return {}
    updates: dict[int, dict[str, UpdateStats]] = {}
    for step, name, stats in db.execute("SELECT step, param, stats FROM updates ORDER BY step, rowid"):
        updates.setdefault(step, {})[name] = UpdateStats.from_dict(json.loads(stats))
    return updates
