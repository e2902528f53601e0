"""Erasure requests: a person's ids and events removed from the state, and the proof that they are gone.

A request is recorded in an append-only ledger under the state folder as the salted sha256 of each
id, never the id itself: the ledger, the forget run's Airflow conf and its logs carry only hashes and
the request's own id. Everything that looks for a forgotten id (the lake rewrite, ingest, the
verifier) hashes the strings it meets with the ledger's salt and compares hashes.

Strings are compared whole and as their tokens (what separators such as quotes, commas, colons and
white space delimit), so an id inside a quarantined record's JSON or a line of a log is found too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_pipeline.artifacts import TRAIN_CSR
from recsys_pipeline.embeddings import presence_mask
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir, publish_snapshot, recover_pointer, replace_file
from recsys_pipeline.state import StateLayout
from recsys_pipeline.tables import CSR_ARRAYS, rows_of, write_csr

# What separates an id from what surrounds it in a serialised record or a log line. Ids themselves
# are trimmed and hold no control characters (ingest quarantines those).
TOKEN_SEPARATORS = re.compile(r"[\s\"'`,;:=|(){}\[\]<>]+")
ERASED_MARK = "[erased]"
# Files the verifier reads as text (anything else that is not Parquet or NumPy is binary and skipped).
TEXT_SUFFIXES = frozenset(
    {".json", ".jsonl", ".txt", ".log", ".html", ".yaml", ".yml", ".csv", ".tsv", ".md"}
)


class ErasureError(RecsysError):
    """An erasure request that cannot be recorded or honoured as asked."""


@dataclass(frozen=True)
class ForgetRequest:
    request_id: str
    requested_at: str
    reason: str
    user_hashes: tuple[str, ...]


@dataclass(frozen=True)
class Forgotten:
    """The salt and every id hash the ledger holds: what the state must no longer contain."""

    salt: bytes
    user_hashes: frozenset[str]
    # A value's verdict, kept: the same ids recur in every lake partition and every run folder.
    _verdicts: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def matches(self, value: str) -> bool:
        verdict = self._verdicts.get(value)
        if verdict is None:
            verdict = any(id_hash(self.salt, token) in self.user_hashes for token in tokens(value))
            self._verdicts[value] = verdict
        return verdict

    def matching(self, values: Iterable[str]) -> set[str]:
        """The values among ``values`` that are forgotten ids, whole or by one of their tokens."""
        return {value for value in values if self.matches(value)}

    def scrubbed(self, text: str) -> str:
        """``text`` with each token that is a forgotten id replaced by ``[erased]``."""
        # A capturing split keeps the separators, at the odd positions.
        parts = re.split(f"({TOKEN_SEPARATORS.pattern})", text)
        return "".join(
            ERASED_MARK if position % 2 == 0 and part and self.matches(part) else part
            for position, part in enumerate(parts)
        )


def id_hash(salt: bytes, value: str) -> str:
    return hashlib.sha256(salt + value.encode()).hexdigest()


def tokens(text: str) -> set[str]:
    """``text`` whole and each of its separator-delimited tokens."""
    return {text, *(token for token in TOKEN_SEPARATORS.split(text) if token)}


@dataclass
class ErasureLedger:
    """The state's append-only record of erasure requests (``erasure/ledger.jsonl``) and its salt.

    Each line is a request (``kind: request``) or a completed erasure of one (``kind: erased``, with
    what it removed); nothing is ever rewritten. The salt is drawn once, kept beside the ledger
    readable by its owner only: with it, a hash can be checked against a guess, so it is as private
    as the state.
    """

    layout: StateLayout
    folder: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = self.layout.home / "erasure"

    @property
    def path(self) -> Path:
        return self.folder / "ledger.jsonl"

    def salt(self) -> bytes:
        path = self.folder / "salt"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".salt-{uuid.uuid4().hex}")
            descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
            # link, not rename: two first requests at once keep whichever salt landed first.
            try:
                os.link(staging, path)
            except FileExistsError:
                pass
            staging.unlink()
        return bytes.fromhex(path.read_text().strip())

    def record(self, user_ids: Sequence[str], reason: str, now: datetime | None = None) -> ForgetRequest:
        """Append a request to forget ``user_ids``; return it (its ``request_id`` names it to the DAG)."""
        ids = sorted({user_id.strip() for user_id in user_ids if user_id.strip()})
        if not ids:
            raise ErasureError("an erasure request needs at least one non-empty user id")
        salt, moment = self.salt(), now or datetime.now(UTC)
        request = ForgetRequest(
            request_id=f"forget-{moment.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}",
            requested_at=moment.isoformat(),
            reason=reason,
            user_hashes=tuple(id_hash(salt, user_id) for user_id in ids),
        )
        self._append({"kind": "request", **asdict(request)})
        return request

    def record_erased(self, request_id: str, summary: dict[str, float]) -> None:
        self.request(request_id)
        self._append(
            {"kind": "erased", "request_id": request_id, "at": datetime.now(UTC).isoformat(), **summary}
        )

    def _append(self, entry: dict[str, object]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.layout.lock(name="aliases"), self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def entries(self) -> Iterator[dict[str, object]]:
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)

    def requests(self) -> list[ForgetRequest]:
        return [
            ForgetRequest(
                str(entry["request_id"]),
                str(entry["requested_at"]),
                str(entry["reason"]),
                tuple(entry["user_hashes"]),  # type: ignore[arg-type]
            )
            for entry in self.entries()
            if entry["kind"] == "request"
        ]

    def request(self, request_id: str) -> ForgetRequest:
        for request in self.requests():
            if request.request_id == request_id:
                return request
        raise ErasureError(f"no erasure request {request_id!r} in {self.path}")

    def forgotten(self) -> Forgotten | None:
        """Every id any request asked to forget; None when there was no request (nothing to check)."""
        requests = self.requests()
        if not requests:
            return None
        return Forgotten(self.salt(), frozenset(h for request in requests for h in request.user_hashes))


def forgotten_values(values: pa.ChunkedArray | pa.Array, forgotten: Forgotten) -> pa.Array:
    """The distinct strings of ``values`` that are (or hold, as a token) a forgotten id."""
    distinct = pc.unique(values).drop_null()
    return pa.array(sorted(forgotten.matching(distinct.to_pylist())), pa.string())


def without_forgotten(table: pa.Table, columns: Sequence[str], forgotten: Forgotten) -> tuple[pa.Table, int]:
    """``table`` without the rows whose ``columns`` hold a forgotten id; (kept rows, rows dropped)."""
    keep = pa.array(np.ones(table.num_rows, dtype=bool))
    for column in columns:
        hits = forgotten_values(table.column(column), forgotten)
        if len(hits):
            keep = pc.and_(
                keep, pc.invert(pc.fill_null(pc.is_in(table.column(column), value_set=hits), False))
            )
    kept = table.filter(keep)
    return kept, table.num_rows - kept.num_rows


@dataclass
class Rewritten:
    """What a rewrite of Parquet files removed."""

    files_rewritten: int = 0
    rows_removed: int = 0
    bytes_rewritten: int = 0
    bytes_scanned: int = 0
    partitions: set[str] = field(default_factory=set)


def erase_rows(files: Iterable[Path], columns: Sequence[str], forgotten: Forgotten) -> Rewritten:
    """Rewrite each Parquet file in ``files`` whose ``columns`` hold a forgotten id without those rows.

    Only ``columns`` of each file are read to decide; a file is rewritten beside itself and swapped in
    with one rename (a crash leaves the old file or the new one, and a re-run finds nothing left to
    do). The schema, Spark's metadata included, is kept, so Spark and Arrow read the file as before.
    """
    done = Rewritten()
    for path in files:
        parquet = pq.ParquetFile(path)
        done.bytes_scanned += path.stat().st_size
        present = [column for column in columns if column in parquet.schema_arrow.names]
        probe = parquet.read(columns=present)
        if not any(len(forgotten_values(probe.column(column), forgotten)) for column in present):
            continue
        table, removed = without_forgotten(parquet.read(), present, forgotten)
        metadata = parquet.schema_arrow.metadata
        replace_file(path, lambda staging: pq.write_table(table.replace_schema_metadata(metadata), staging))
        done.files_rewritten += 1
        done.rows_removed += removed
        done.bytes_rewritten += path.stat().st_size
        done.partitions.add(str(path.parent))
    return done


def parquet_files(root: Path) -> list[Path]:
    """Data files under ``root``: Spark's and pyarrow's readers skip names starting with ``_`` or ``.``."""
    return sorted(
        path
        for path in root.rglob("*.parquet")
        if not any(part.startswith(("_", ".")) for part in path.relative_to(root).parts)
    )


def tombstoned_map(table: pa.Table, forgotten: Forgotten) -> tuple[pa.Table, int]:
    """An ID map (``id``, ``idx``) with each forgotten id's ``id`` emptied; (the map, ids emptied).

    The index stays taken (a tombstone): indices are never reused, so no later id lands on the
    forgotten user's row of a model trained before.
    """
    hits = forgotten_values(table.column("id"), forgotten)
    if not len(hits):
        return table, 0
    forgotten_rows = pc.fill_null(pc.is_in(table.column("id"), value_set=hits), False)
    ids = pc.if_else(forgotten_rows, pa.scalar(None, pa.string()), table.column("id"))
    return table.set_column(table.schema.get_field_index("id"), "id", ids), len(hits)


def tombstones(table: pa.Table) -> pa.Array:
    """The indices of an ID map whose id was erased."""
    return table.filter(pc.is_null(table.column("id"))).column("idx").combine_chunks()


def tombstone_ids(pointer: Path, forgotten: Forgotten) -> tuple[int, pa.Array]:
    """Publish a new snapshot of the shared ID map at ``pointer`` with the forgotten ids tombstoned
    (see :func:`tombstoned_map`); (ids tombstoned now, every tombstoned index of the map)."""
    recover_pointer(pointer)
    files = parquet_files(pointer) if pointer.exists() else []
    if not files:
        return 0, pa.array([], pa.int32())
    table = pa.concat_tables(pq.read_table(path) for path in files)
    tombstoned, count = tombstoned_map(table, forgotten)
    if count:
        metadata = pq.ParquetFile(files[0]).schema_arrow.metadata

        def write(folder: Path) -> None:
            folder.mkdir(parents=True)
            pq.write_table(tombstoned.replace_schema_metadata(metadata), folder / "part-00000.parquet")

        publish_snapshot(pointer, write)
    return count, tombstones(tombstoned)


@dataclass
class Scrubbed:
    """What a scrub of a folder tree changed."""

    files_rewritten: list[str] = field(default_factory=list)
    rows_removed: int = 0
    ids_tombstoned: int = 0


def scrub_tree(root: Path, forgotten: Forgotten, user_tombstones: pa.Array) -> Scrubbed:
    """Remove the forgotten users from every file under ``root`` this pipeline writes, in place:

    - a users' ID map (columns ``id``, ``idx`` under a ``users`` name) keeps its rows, the forgotten
      ids tombstoned;
    - any other Parquet table loses the rows naming a forgotten id in a ``user_id`` column or a
      tombstoned user in ``user_idx`` (or ``idx`` under ``users/``, a list of users' indices);
    - JSON files have each string value holding a forgotten id replaced by ``[erased]``, other text
      files (logs, HTML reports) each such token;
    - a training matrix's CSR arrays (``train_csr/``) lose the tombstoned users' rows, rewritten as a
      folder; a copy of one a crash left beside it is removed.

    Item ids are never touched, even where one reads like a forgotten user id. Each file is
    rewritten beside itself and renamed over it.
    """
    done = Scrubbed()
    for folder in sorted(path for path in root.rglob(f"*{TRAIN_CSR}*") if path.is_dir()):
        if folder.name == TRAIN_CSR:
            _scrub_csr(folder, user_tombstones, done)
        else:  # set aside or never swapped in (files.atomic_dir): nothing reads it
            shutil.rmtree(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        if path.suffix == ".parquet":
            _scrub_parquet(path, forgotten, user_tombstones, done)
        elif path.suffix in TEXT_SUFFIXES:
            text = path.read_text(errors="replace")
            cleaned = _scrubbed_json(text, forgotten) if path.suffix == ".json" else forgotten.scrubbed(text)
            if cleaned != text:
                replace_file(path, partial(Path.write_text, data=cleaned))
                done.files_rewritten.append(str(path))
    return done


def _scrubbed_json(text: str, forgotten: Forgotten) -> str:
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return forgotten.scrubbed(text)

    def clean(value: object) -> object:
        if isinstance(value, str):
            return forgotten.scrubbed(value)
        if isinstance(value, list):
            return [clean(child) for child in value]
        if isinstance(value, dict):
            return {forgotten.scrubbed(key): clean(child) for key, child in value.items()}
        return value

    cleaned = clean(document)
    return text if cleaned == document else json.dumps(cleaned, indent=1)


def is_users_file(path: Path) -> bool:
    """Whether the file's ``idx`` column indexes users: ``users/`` folders, ``users.parquet``,
    ``user_factors.parquet``."""
    return "users" in path.parts[:-1] or path.stem == "users" or path.stem.startswith("user_")


def is_users_map(path: Path, table: pa.Table) -> bool:
    return set(table.column_names) == {"id", "idx"} and is_users_file(path)


def _scrub_parquet(path: Path, forgotten: Forgotten, user_tombstones: pa.Array, done: Scrubbed) -> None:
    try:
        columns = set(pq.read_schema(path).names)
    except (pa.ArrowInvalid, OSError):
        return  # not a table this pipeline wrote: the verifier still reads its strings
    if not (columns & {"user_id", "user_idx"} or ("idx" in columns and is_users_file(path))):
        return  # nothing in it names a user (an item table, a matrix of items)
    table = pq.read_table(path)
    metadata = table.schema.metadata
    if is_users_map(path, table):
        changed, count = tombstoned_map(table, forgotten)
        done.ids_tombstoned += count
    else:
        names = ["user_id"] if "user_id" in table.column_names else []
        changed, count = without_forgotten(table, names, forgotten)
        index = "user_idx" if "user_idx" in table.column_names else None
        if index is None and "idx" in table.column_names and is_users_file(path):
            index = "idx"  # user factors, or a list of users' indices
        if index is not None and len(user_tombstones):
            taken = pc.is_in(
                changed.column(index), value_set=user_tombstones.cast(changed.column(index).type)
            )
            kept = changed.filter(pc.invert(taken))
            count += changed.num_rows - kept.num_rows
            changed = kept
        done.rows_removed += count
    if count:

        def write(staging: Path) -> None:
            pq.write_table(changed.replace_schema_metadata(metadata), staging)

        replace_file(path, write)
        done.files_rewritten.append(str(path))


def _scrub_csr(folder: Path, user_tombstones: pa.Array, done: Scrubbed) -> None:
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False) for name in CSR_ARRAYS}
    n_users = len(arrays["indptr"]) - 1
    tombstoned = user_tombstones.to_numpy(zero_copy_only=False).astype(np.int64)
    gone = presence_mask(tombstoned[tombstoned < n_users], n_users)
    count = int(np.diff(arrays["indptr"])[gone].sum())
    if count:
        matrix = sp.csr_matrix(
            (arrays["data"], arrays["indices"], arrays["indptr"]),
            shape=(n_users, int(arrays["indices"].max()) + 1),
        )
        with atomic_dir(folder) as staging:
            write_csr(rows_of(matrix, ~gone), staging)
        done.rows_removed += count
        done.files_rewritten.append(str(folder))


@dataclass
class Finding:
    """A forgotten id found by the verifier: in which file, and where in it (column or line)."""

    path: str
    where: str
    count: int


@dataclass
class Verification:
    files_checked: int = 0
    strings_checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.findings


# Runs of printable text inside a binary file (a SQLite database, for one): what `strings` prints.
PRINTABLE_RUN = re.compile(rb"[\x20-\x7e\x80-\xff]{3,}")


def verify(roots: Iterable[Path], forgotten: Forgotten, skip: Iterable[Path] = ()) -> Verification:
    """Hash every string under ``roots`` (Parquet string columns, NumPy string arrays, text files
    line by line, zstd-compressed logs, and the printable runs of any other file) and report where
    one is, or holds, a forgotten id."""
    skipped = {path.resolve() for path in skip}
    result = Verification()
    seen: set[Path] = set()
    for root in roots:
        for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
            resolved = path.resolve()
            if not path.is_file() or path.is_symlink() or resolved in seen:
                continue
            if any(resolved == s or s in resolved.parents for s in skipped):
                continue
            seen.add(resolved)
            result.files_checked += 1
            for where, values in file_strings(path):
                result.strings_checked += len(values)
                hits = forgotten.matching(values)
                if hits:
                    result.findings.append(Finding(str(path), where, len(hits)))
    return result


def file_strings(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(where, distinct strings) per part of a file the verifier reads."""
    if path.suffix == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError):
            yield from _binary_strings(path)
            return
        items_map = set(parquet.schema_arrow.names) == {"id", "idx"} and "items" in (
            *path.parts[:-1],
            path.stem,
        )
        for name in parquet.schema_arrow.names:
            kind = parquet.schema_arrow.field(name).type
            if name.startswith("item") or items_map:
                continue  # item ids: a catalogue's, never a person's
            if pa.types.is_string(kind) or pa.types.is_large_string(kind):
                yield (
                    f"column {name}",
                    pc.unique(parquet.read(columns=[name]).column(name)).drop_null().to_pylist(),
                )
        return
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False, mmap_mode="r")
        if array.dtype.kind in "US":
            yield "array", sorted({str(value) for value in np.asarray(array).ravel()})
        return
    if path.suffix == ".zstd":
        with pa.CompressedInputStream(pa.OSFile(str(path)), "zstd") as stream:
            yield "decompressed", _text_lines(stream.read().decode(errors="replace"))
        return
    data = path.read_bytes()
    if path.suffix == ".json":
        try:
            yield "json strings", sorted(set(_json_strings(json.loads(data))))
            return
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if path.suffix in TEXT_SUFFIXES or b"\x00" not in data[:8192]:
        yield "text", _text_lines(data.decode(errors="replace"))
    else:
        yield from _binary_strings(path, data)


def _json_strings(value: object) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for child in value:
            yield from _json_strings(child)
    elif isinstance(value, dict):
        for key, child in value.items():
            yield key
            yield from _json_strings(child)


def _text_lines(text: str) -> list[str]:
    return sorted({line for line in text.splitlines() if line.strip()})


def _binary_strings(path: Path, data: bytes | None = None) -> Iterator[tuple[str, list[str]]]:
    runs = PRINTABLE_RUN.findall(path.read_bytes() if data is None else data)
    yield "printable runs", sorted({run.decode(errors="replace") for run in runs})
