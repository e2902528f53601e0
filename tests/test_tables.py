from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_pipeline.tables import (
    MATRIX_ARROW_SCHEMA,
    Triples,
    pair_batches,
    pair_tables,
    read_csr,
    read_csr_matrix,
    rows_of,
    write_csr,
)


def random_triples(rng: np.random.Generator, n_users: int, n_items: int, n_pairs: int) -> Triples:
    """Random pairs, some repeated (a matrix sums them)."""
    return Triples(
        rng.integers(0, n_users, n_pairs).astype(np.int32),
        rng.integers(0, n_items, n_pairs).astype(np.int32),
        rng.random(n_pairs).astype(np.float32),
    )


def test_a_matrix_of_some_users_holds_their_rows_whole_and_no_other_rows() -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 20
    triples = random_triples(rng, n_users, n_items, 400)
    users = rng.random(n_users) < 0.3
    whole, some = triples.to_csr(n_users, n_items), triples.to_csr(n_users, n_items, users)
    assert some.shape == whole.shape
    np.testing.assert_allclose(some[users].toarray(), whole[users].toarray())
    assert some[~users].nnz == 0 and whole[~users].nnz > 0


def test_a_csr_matrix_written_reads_back_whole_and_as_its_pairs(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n_users, n_items, n_pairs = 40, 25, 300
    triples = random_triples(rng, n_users, n_items, n_pairs)
    matrix = triples.to_csr(n_users, n_items)
    write_csr(matrix, tmp_path / "csr")
    read = read_csr(tmp_path / "csr", n_items)
    assert read.shape == (n_users, n_items) and read.dtype == np.float32
    np.testing.assert_array_equal(read.toarray(), matrix.toarray())
    # Its pairs, row by row, make the same matrix again (duplicates of the triples summed once).
    pairs = Triples.of_csr(read)
    assert pairs.nnz == matrix.nnz < n_pairs
    np.testing.assert_array_equal(pairs.to_csr(n_users, n_items).toarray(), matrix.toarray())
    users = rng.random(n_users) < 0.3
    np.testing.assert_array_equal(
        rows_of(read, users).toarray(), triples.to_csr(n_users, n_items, users).toarray()
    )


def test_a_matrix_read_in_batches_is_the_one_its_pairs_make_at_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n_users, n_items = 50, 30
    parts = [random_triples(rng, n_users, n_items, n_pairs) for n_pairs in (700, 500)]
    folder = tmp_path / "train"
    folder.mkdir()
    for number, part in enumerate(parts):
        table = pa.table([part.user_idx, part.item_idx, part.confidence], schema=MATRIX_ARROW_SCHEMA)
        pq.write_table(table, folder / f"part-{number:05d}.parquet", row_group_size=90)
    whole = Triples(
        *(np.concatenate(arrays) for arrays in zip(*(vars(p).values() for p in parts), strict=True))
    )
    expected = whole.to_csr(n_users, n_items)
    # Batches of 64 pairs: pairs repeat within a batch, across batches and across files.
    read = read_csr_matrix(folder, n_users, n_items, batch_rows=64)
    assert read.has_canonical_format and read.nnz == expected.nnz < whole.nnz
    np.testing.assert_array_equal(read.indptr, expected.indptr)
    np.testing.assert_array_equal(read.indices, expected.indices)
    np.testing.assert_allclose(read.data, expected.data, rtol=1e-6)


def test_pair_files_are_read_in_bounded_batches_and_tables_every_pair_once_in_order(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "pairs"
    folder.mkdir()
    written = 0
    # Files of several row groups, one without any (Spark writes empty partitions so).
    for number, (n_pairs, group) in enumerate([(1000, 90), (0, 10), (1037, 300), (5, 1000)]):
        users = np.arange(written, written + n_pairs, dtype=np.int32)
        written += n_pairs
        table = pa.table([users, users, users.astype(np.float32)], schema=MATRIX_ARROW_SCHEMA)
        pq.write_table(table, folder / f"part-{number:05d}.parquet", row_group_size=group)
    (folder / "_SUCCESS").touch()
    for batch_rows in (1, 64, 5000):
        batches = list(pair_batches(folder, ["user_idx", "confidence"], batch_rows))
        assert all(0 < batch.num_rows <= batch_rows for batch in batches)
        assert all(batch.schema.names == ["user_idx", "confidence"] for batch in batches)
        read = np.concatenate([batch.column("user_idx").to_numpy() for batch in batches])
        np.testing.assert_array_equal(read, np.arange(written))
        # Gathered into tables of at most batch_rows pairs, every pair once, in the same order.
        tables = list(pair_tables(folder, ["user_idx", "confidence"], batch_rows))
        assert all(0 < table.num_rows <= batch_rows for table in tables)
        gathered = np.concatenate([table.column("user_idx").to_numpy() for table in tables])
        np.testing.assert_array_equal(gathered, np.arange(written))
    # Row groups smaller than a batch are gathered whole (here all of them, into one table); one as
    # large is handed over in slices, never gathered with its neighbours (the 90-pair groups).
    assert len(list(pair_tables(folder, ["user_idx"], 5000))) == 1
    sizes = [table.num_rows for table in pair_tables(folder, ["user_idx"], 64)]
    # The 137-pair group's last slice is not gathered with the next file's 5 pairs: the slice would
    # keep its whole row group in memory while the next one is read.
    assert sizes[:4] == [64, 26, 64, 26] and sizes[-2:] == [9, 5]
    assert [table.num_rows for table in pair_tables(folder, ["user_idx"], 200)][:2] == [180, 180]
