"""Arrow-backed readers shared by the stages and by serving (no Spark needed to read results)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import scipy.sparse as sp

# How matrices are stored: what Spark writes from ``interactions.matrix_columns``, and Arrow from
# ``interactions.write_history_matrices``.
MATRIX_ARROW_SCHEMA = pa.schema(
    [("user_idx", pa.int32()), ("item_idx", pa.int32()), ("confidence", pa.float32())]
)
# Pair files (matrices, pair histories) are written uncompressed: dense indices and confidences
# hardly compress (snappy kept a 16M-pair history at 244 MB of 366), and a night's stage writes and
# reads its history several times over; uncompressed it wrote in 0.62 s instead of 1.18 s and read
# back in 0.23 s instead of 1.01 s.
PAIR_FILE_COMPRESSION = "none"


def pair_batches(path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """The pair files in the folder ``path`` (a matrix, a pair history), read one Parquet row group at a
    time and handed over at most ``batch_rows`` pairs a batch: memory holds one row group. Over 73M
    pairs laid out as Spark writes a 100M-event history (8 files of 128 MB row groups), the matrices'
    passes peaked at 2.9 GB through Arrow's dataset scanner, which buffers whole files ahead, and at
    0.9 GB so; ``ParquetFile.iter_batches``, its batches spanning row groups, held 0.8 GB of one
    57M-pair file's 0.7 GB where this holds 34 MB."""
    for file in sorted(path.glob("*.parquet")):
        pairs = pq.ParquetFile(file)
        for group in range(pairs.num_row_groups):
            yield from pairs.read_row_group(group, columns=columns).to_batches(max_chunksize=batch_rows)


def pair_tables(path: Path, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    """The pair files in the folder ``path`` as tables of at most ``batch_rows`` pairs, for steps whose
    cost is per call rather than per pair (a lookup builds its set anew on each call): row groups
    smaller than that (Arrow writes 1M pairs a group) are gathered whole, larger ones (Spark writes
    128 MB) handed over in slices as :func:`pair_batches` does. Memory holds one large row group or
    ``batch_rows`` pairs: gathering the slices of two large groups held both."""
    gathered: list[pa.Table] = []
    rows = 0
    for file in sorted(path.glob("*.parquet")):
        pairs = pq.ParquetFile(file)
        for group in range(pairs.num_row_groups):
            size = pairs.metadata.row_group(group).num_rows
            if gathered and (size >= batch_rows or rows + size > batch_rows):
                yield pa.concat_tables(gathered)
                gathered, rows = [], 0
            table = pairs.read_row_group(group, columns=columns)
            if size >= batch_rows:
                yield from (
                    pa.Table.from_batches([batch]) for batch in table.to_batches(max_chunksize=batch_rows)
                )
            elif size:
                gathered.append(table)
                rows += size
    if gathered:
        yield pa.concat_tables(gathered)


@dataclass(frozen=True)
class Triples:
    """A sparse matrix as parallel arrays, straight from Parquet via Arrow."""

    user_idx: np.ndarray
    item_idx: np.ndarray
    confidence: np.ndarray

    @property
    def nnz(self) -> int:
        return len(self.confidence)

    @classmethod
    def of_csr(cls, matrix: sp.csr_matrix) -> Triples:
        """The pairs of a CSR matrix, row by row."""
        rows = np.repeat(np.arange(matrix.shape[0], dtype=np.int32), np.diff(matrix.indptr))
        return cls(rows, matrix.indices, matrix.data)

    def to_csr(self, n_users: int, n_items: int, users: np.ndarray | None = None) -> sp.csr_matrix:
        """A CSR matrix of shape (n_users, n_items), of every pair or only of the users ``users`` flags
        (a bool per user; the other rows are empty); duplicate pairs are summed."""
        user_idx, item_idx, confidence = self.user_idx, self.item_idx, self.confidence
        if users is not None:
            kept = users[user_idx]
            user_idx, item_idx, confidence = user_idx[kept], item_idx[kept], confidence[kept]
        # COO to CSR sums duplicates and sorts each row as it converts: no second pass needed.
        return sp.coo_matrix(
            (confidence.astype(np.float32), (user_idx, item_idx)), shape=(n_users, n_items)
        ).tocsr()


# A CSR matrix's folder: one NumPy file per array, read back without a conversion.
CSR_ARRAYS = ("indptr", "indices", "data")


def write_csr(matrix: sp.csr_matrix, folder: Path) -> None:
    """``matrix`` as :func:`read_csr` reads it back: its arrays as NumPy files (no pickle)."""
    folder.mkdir(parents=True)
    for name in CSR_ARRAYS:
        np.save(folder / f"{name}.npy", getattr(matrix, name), allow_pickle=False)


def read_csr(folder: Path, n_items: int) -> sp.csr_matrix:
    """A matrix :func:`write_csr` wrote, ``n_items`` wide."""
    indptr, indices, data = (np.load(folder / f"{name}.npy", allow_pickle=False) for name in CSR_ARRAYS)
    return sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_items))


def rows_of(matrix: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    """``matrix`` with only the rows ``users`` flags (a bool per row; the others empty)."""
    counts = np.where(users, np.diff(matrix.indptr), 0)
    kept = np.repeat(users, np.diff(matrix.indptr))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(matrix.indptr.dtype, copy=False)
    return sp.csr_matrix((matrix.data[kept], matrix.indices[kept], indptr), shape=matrix.shape)


# Pairs :func:`read_csr_matrix` places at a time: a batch's CSR and placement take about 70 bytes a
# pair (a 57M-pair matrix's read peaked at 1.17 GB in 4M-pair batches, at 0.89 GB in 1M-pair ones, as
# fast).
CSR_BATCH_ROWS = 1 << 20


def read_csr_matrix(
    path: Path, n_users: int, n_items: int, batch_rows: int = CSR_BATCH_ROWS
) -> sp.csr_matrix:
    """The (user_idx, item_idx, confidence) pairs of a Parquet folder as a CSR matrix of shape
    (n_users, n_items), as :meth:`Triples.to_csr` makes it (duplicate pairs summed), built
    ``batch_rows`` pairs at a time: memory holds the matrix's arrays and one batch.

    Each user's pairs are counted first (one column); then each batch, made a CSR matrix of its own,
    is copied into every user's next free places. Read whole and converted at once, 82.7M training
    pairs of a 100M-event week took the process to 3.2 GB, beside the Spark job's JVM.
    """
    counts = np.zeros(n_users, dtype=np.int64)
    for batch in pair_batches(path, ["user_idx"], batch_rows):
        counts += np.bincount(batch.column(0).to_numpy(), minlength=n_users)
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.empty(indptr[-1], dtype=np.int32)
    data = np.empty(indptr[-1], dtype=np.float32)
    filled = indptr[:-1].copy()  # each user's next free place
    users = np.arange(n_users)
    for batch in pair_batches(path, ["user_idx", "item_idx", "confidence"], batch_rows):
        part = sp.csr_matrix(
            (
                batch.column(2).to_numpy().astype(np.float32, copy=False),
                (batch.column(0).to_numpy(), batch.column(1).to_numpy()),
            ),
            shape=(n_users, n_items),
        )
        per_user = np.diff(part.indptr)
        owner = np.repeat(users, per_user)
        places = filled[owner] + (np.arange(part.nnz) - part.indptr[owner])
        indices[places], data[places] = part.indices, part.data
        filled += per_user
    if (filled != indptr[1:]).any():
        # A batch summed pairs it held twice: its users' rows end short of what was counted.
        kept = np.arange(len(indices)) - np.repeat(indptr[:-1], counts) < np.repeat(
            filled - indptr[:-1], counts
        )
        indices, data = indices[kept], data[kept]
        indptr[1:] = np.cumsum(filled - indptr[:-1])
    matrix = sp.csr_matrix((data, indices, indptr), shape=(n_users, n_items))
    matrix.sum_duplicates()  # sorts each row's items, and sums pairs repeated across batches
    return matrix


def read_matrix(path: Path) -> Triples:
    """Read (user_idx, item_idx, confidence) columns as NumPy arrays without going through pandas;
    indices keep their stored 32-bit type (half the memory of int64, and what CSR uses)."""
    table = ds.dataset(str(path), format="parquet").to_table(columns=["user_idx", "item_idx", "confidence"])
    return Triples(
        table.column("user_idx").to_numpy(),
        table.column("item_idx").to_numpy(),
        table.column("confidence").to_numpy().astype(np.float32, copy=False),
    )


def read_id_map(path: Path) -> np.ndarray:
    """Source ids as strings, positioned by their dense index."""
    table = ds.dataset(str(path), format="parquet").to_table(columns=["id", "idx"])
    idx = table.column("idx").to_numpy()
    ids = np.empty(len(idx), dtype=object)
    ids[idx] = np.asarray(table.column("id").to_pylist(), dtype=object)
    return ids


def count_rows(path: Path) -> int:
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(path.glob("*.parquet")))


def distinct_users(path: Path) -> int:
    """Users with at least one pair in a matrix folder, counted by Arrow (no Spark job)."""
    table = ds.dataset(str(path), format="parquet").to_table(columns=["user_idx"])
    return int(pc.count_distinct(table.column("user_idx")).as_py())


def read_indices(path: Path) -> np.ndarray:
    """The ``idx`` column of a Parquet folder (e.g. the users active in a run)."""
    table = ds.dataset(str(path), format="parquet").to_table(columns=["idx"])
    return table.column("idx").to_numpy().astype(np.int64)


def write_indices(path: Path, indices: np.ndarray) -> None:
    """A folder :func:`read_indices` reads ``indices`` back from."""
    path.mkdir(parents=True)
    pq.write_table(pa.table({"idx": pa.array(indices, pa.int32())}), path / "part-00000.parquet")


def distinct_values(paths: list[Path], column: str) -> pa.Array:
    """The distinct string values of one column over Parquet files or folders, read batch by batch:
    memory holds the distinct values (and at most as many again unmerged), never the rows."""
    distinct = pa.array([], pa.string())
    pending: list[pa.Array] = []
    pending_rows = 0
    for path in paths:
        for batch in ds.dataset(str(path), format="parquet").to_batches(columns=[column]):
            pending.append(pc.unique(batch.column(0).cast(pa.string())))
            pending_rows += len(pending[-1])
            # Merged once the unmerged values outnumber the distinct ones: linear in the rows read.
            if pending_rows > max(len(distinct), 1 << 16):
                distinct = pc.unique(pa.concat_arrays([distinct, *pending]))
                pending, pending_rows = [], 0
    return pc.unique(pa.concat_arrays([distinct, *pending]))
