"""The ``Embeddings`` type and its Parquet files, shared by training, refresh, index, drift and serving.

Factor files::

    user_factors.parquet   idx INT, factors FIXED_SIZE_LIST<FLOAT32>[factors]   users with a vector
    item_factors.parquet   idx INT, factors FIXED_SIZE_LIST<FLOAT32>[factors]   items with a vector
    cold_items.parquet     idx INT   items whose vector is mapped from content, not learned (optional)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

USER_FACTORS, ITEM_FACTORS = "user_factors.parquet", "item_factors.parquet"
COLD_ITEMS = "cold_items.parquet"
PRIOR_DIMS = "prior_dims"  # factor files' schema metadata: trailing dimensions that are not learned


@dataclass(frozen=True)
class Embeddings:
    """Factors for the users and items that had training data.

    ``user_idx``/``item_idx`` are dense indices from the ID maps; row ``r`` of
    ``user_factors`` is the vector of user ``user_idx[r]``.
    """

    user_idx: np.ndarray
    user_factors: np.ndarray
    item_idx: np.ndarray
    item_factors: np.ndarray
    # Items whose vector was mapped from their content (too few interactions to learn one), sorted.
    cold_item_idx: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    # Trailing dimensions that score but are not learned geometry: the popularity prior's (its weight
    # on the user side, log popularity on the item side). Recommendations use every dimension;
    # item-to-item similarity, drift and the embedding checks use :meth:`learned`.
    prior_dims: int = 0

    def learned(self) -> Embeddings:
        """These embeddings without the prior's dimensions."""
        if not self.prior_dims:
            return self
        width = self.item_factors.shape[1] - self.prior_dims
        return replace(
            self,
            user_factors=self.user_factors[:, :width],
            item_factors=self.item_factors[:, :width],
            prior_dims=0,
        )

    def item_rows(self, items: np.ndarray) -> np.ndarray:
        """Rows of ``item_factors`` holding the given item indices (each must have a vector)."""
        order = np.argsort(self.item_idx)
        return order[np.searchsorted(self.item_idx, items, sorter=order)]

    def warm_items(self) -> Embeddings:
        """These embeddings without the cold items: the vectors learned from interactions alone."""
        keep = ~np.isin(self.item_idx, self.cold_item_idx)
        return Embeddings(
            self.user_idx,
            self.user_factors,
            self.item_idx[keep],
            self.item_factors[keep],
            prior_dims=self.prior_dims,
        )

    def dense_users(self, n_users: int) -> np.ndarray:
        """(n_users, factors) with zero rows for users without a vector."""
        return scatter(self.user_idx, self.user_factors, n_users)

    def dense_items(self, n_items: int) -> np.ndarray:
        return scatter(self.item_idx, self.item_factors, n_items)


def scatter(idx: np.ndarray, factors: np.ndarray, size: int) -> np.ndarray:
    """(size, factors) with row ``idx[r]`` = ``factors[r]`` and zeros elsewhere."""
    dense = np.zeros((size, factors.shape[1]), dtype=np.float32)
    dense[idx] = factors
    return dense


def presence_mask(idx: np.ndarray, size: int) -> np.ndarray:
    """Boolean (size,) that is True at the given dense indices: which rows have a vector."""
    mask = np.zeros(size, dtype=bool)
    mask[idx[idx < size]] = True
    return mask


def write_factors(path: Path, idx: np.ndarray, factors: np.ndarray, prior_dims: int = 0) -> None:
    flat = pa.array(factors.astype(np.float32).ravel())
    vectors = pa.FixedSizeListArray.from_arrays(flat, factors.shape[1])
    table = pa.table({"idx": pa.array(idx.astype(np.int32)), "factors": vectors})
    pq.write_table(table.replace_schema_metadata({PRIOR_DIMS: str(prior_dims)}), path)


def read_factors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    column = table.column("factors").combine_chunks()
    width = column.type.list_size
    factors = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32)
    return table.column("idx").to_numpy().astype(np.int64), factors


def write_embeddings(directory: Path, embeddings: Embeddings) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_factors(
        directory / USER_FACTORS, embeddings.user_idx, embeddings.user_factors, embeddings.prior_dims
    )
    write_factors(
        directory / ITEM_FACTORS, embeddings.item_idx, embeddings.item_factors, embeddings.prior_dims
    )
    if len(embeddings.cold_item_idx):
        pq.write_table(
            pa.table({"idx": pa.array(embeddings.cold_item_idx.astype(np.int32))}), directory / COLD_ITEMS
        )


def read_embeddings(directory: Path) -> Embeddings:
    user_idx, user_factors = read_factors(directory / USER_FACTORS)
    item_idx, item_factors = read_factors(directory / ITEM_FACTORS)
    cold = directory / COLD_ITEMS
    cold_idx = (
        np.sort(pq.read_table(cold).column("idx").to_numpy().astype(np.int64))
        if cold.exists()
        else np.empty(0, dtype=np.int64)
    )
    metadata = pq.read_schema(directory / ITEM_FACTORS).metadata or {}
    prior_dims = int(metadata.get(PRIOR_DIMS.encode(), b"0"))  # files from before the prior have none
    return Embeddings(user_idx, user_factors, item_idx, item_factors, cold_idx, prior_dims)
