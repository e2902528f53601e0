"""Content embeddings: item metadata gives every item a vector on day one, mapped into the ALS space.

An item with too few interactions has no collaborative vector, so it could never be recommended or
found by ``similar``. Its metadata can: an encoder turns metadata into content vectors, and a ridge
map fitted on warm items (those with both) carries content vectors into the item-factor space,
where they are searched beside the collaborative ones and flagged ``cold``.

Encoders (``content.encoder``):

* ``builtin`` TF-IDF over the text columns, one-hot categoricals and standardised numerics, each
  block row-normalised, reduced by truncated SVD to ``content.dim``. Fitted on a seeded sample of
  at most ``content.fit_sample`` items and applied in batches, so memory follows the batch.
* ``precomputed`` another team's vectors (BERT, CLIP, ...) from a Parquet of ``id -> vector``.
* ``sentence`` a sentence-transformers model from a local folder whose hash is checked.

Nothing here opens a network connection: models load from disk or not at all.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import scipy.sparse as sp

from recsys_pipeline.config import ContentConfig, ContentMapConfig, ContentSourceConfig
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import file_sha256

ITEM_ID = "item_id"
QUARANTINE_REASONS = ("unparseable_record", "missing_item_id", "duplicate_item_id", "invalid_numeric")
QUARANTINE_SCHEMA = pa.schema([("raw_record", pa.string()), ("reason", pa.string())])


class ContentError(RecsysError):
    """Item metadata or content vectors cannot be used as configured."""


@dataclass(frozen=True)
class MetadataRead:
    items: pa.Table  # item_id plus every configured column, as strings; one row per item
    quarantine: pa.Table  # raw_record, reason
    metrics: dict[str, float]


def _csv_header(path: Path, delimiter: str, encoding: str) -> list[str]:
    with path.open(newline="", encoding=encoding, errors="replace") as lines:
        return next(csv.reader(lines, delimiter=delimiter), [])


def read_metadata(source: ContentSourceConfig) -> MetadataRead:
    """Read item metadata; quarantine rows that cannot be parsed, lack an id, repeat an id or carry a
    numeric column that is not a number. Every row read is counted in ``metrics``."""
    if not source.path.exists():
        raise ContentError(f"content.source.path {source.path} does not exist")
    unparseable: list[str] = []
    if source.format == "parquet":
        table = pq.read_table(source.path)
        table = table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
    else:

        def keep_aside(row: Any) -> str:
            unparseable.append(row.text)
            return "skip"

        try:
            # Every column read as text, the header's too: inferred types would make id "007" the
            # number 7, another item than the "007" the events name.
            names = source.column_names or _csv_header(source.path, source.delimiter, source.encoding)
            table = pacsv.read_csv(
                source.path,
                read_options=pacsv.ReadOptions(
                    column_names=source.column_names,
                    autogenerate_column_names=False,
                    encoding=source.encoding,
                ),
                parse_options=pacsv.ParseOptions(delimiter=source.delimiter, invalid_row_handler=keep_aside),
                convert_options=pacsv.ConvertOptions(
                    column_types={name: pa.string() for name in names},
                    strings_can_be_null=False,
                    auto_dict_encode=False,
                ),
            )
        except (pa.ArrowInvalid, UnicodeDecodeError) as error:
            raise ContentError(f"content.source {source.path} cannot be read: {error}") from None
        table = table.cast(pa.schema([(name, pa.string()) for name in table.column_names]))
    wanted = [source.id_column, *source.text_columns, *source.categorical_columns, *source.numeric_columns]
    missing = sorted(set(wanted) - set(table.column_names))
    if missing:
        raise ContentError(
            f"content.source {source.path} has no column(s) {missing}; it has {table.column_names}"
        )
    table = table.select(list(dict.fromkeys(wanted))).rename_columns(
        [ITEM_ID if name == source.id_column else name for name in dict.fromkeys(wanted)]
    )
    ids = pc.utf8_trim_whitespace(table.column(ITEM_ID))
    table = table.set_column(0, ITEM_ID, ids)
    reason = np.full(table.num_rows, None, dtype=object)
    reason[~np.asarray(pc.fill_null(pc.greater(pc.utf8_length(ids), 0), False))] = "missing_item_id"
    first = _first_occurrence(ids)
    reason[(reason == None) & ~first] = "duplicate_item_id"  # noqa: E711 (object array)
    for name in source.numeric_columns:
        column = table.column(name)
        blank = np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True))
        parsed = _parse_floats(column)
        reason[(reason == None) & ~blank & ~np.isfinite(parsed)] = "invalid_numeric"  # noqa: E711
    bad = reason != None  # noqa: E711
    quarantine = pa.table(
        {
            "raw_record": pa.array(
                [*unparseable, *(_as_record(table, int(row)) for row in np.flatnonzero(bad))], pa.string()
            ),
            "reason": pa.array(["unparseable_record"] * len(unparseable) + list(reason[bad]), pa.string()),
        },
        schema=QUARANTINE_SCHEMA,
    )
    items = table.filter(pa.array(~bad))
    reasons = Counter(quarantine.column("reason").to_pylist())
    read = table.num_rows + len(unparseable)
    metrics = {
        "items_read": float(read),
        "items_ingested": float(items.num_rows),
        "items_quarantined": float(quarantine.num_rows),
        "items_quarantine_share": quarantine.num_rows / max(read, 1),
        **{f"items_quarantine_{name}": float(reasons.get(name, 0)) for name in QUARANTINE_REASONS},
    }
    return MetadataRead(items, quarantine, metrics)


def _first_occurrence(ids: pa.ChunkedArray) -> np.ndarray:
    _, first = np.unique(
        np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object).astype(str), return_index=True
    )
    mask = np.zeros(len(ids), dtype=bool)
    mask[first] = True
    return mask


def _parse_floats(column: pa.ChunkedArray) -> np.ndarray:
    """Floats of a string column; blanks and non-numbers are NaN."""
    values = np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    parsed = np.full(len(values), np.nan)
    for position, value in enumerate(values):
        try:
            parsed[position] = float(value)
        except (TypeError, ValueError):
            continue
    return parsed


def _as_record(table: pa.Table, row: int) -> str:
    return "|".join(str(table.column(name)[row].as_py()) for name in table.column_names)


def check_quarantine_share(metrics: dict[str, float], max_share: float) -> None:
    share = metrics["items_quarantine_share"]
    if share > max_share:
        raise ContentError(
            f"{share:.1%} of item metadata rows were quarantined, above content.max_quarantine_share="
            f"{max_share:.1%}: check content.source's columns and delimiter"
        )


def check_coverage(named: int, catalogue: int, config: ContentConfig) -> None:
    """Fail when the metadata names fewer than ``content.min_coverage`` of the ``catalogue``'s items
    (``named`` of them): it could not place the catalogue's cold items."""
    if named < config.min_coverage * catalogue:
        raise ContentError(
            f"content.source {config.source.path if config.source else ''} describes {named} of the "
            f"catalogue's {catalogue} items, below content.min_coverage={config.min_coverage:.0%}: "
            "point content.source at your items' metadata, or set content.enabled: false"
        )


def batches(table: pa.Table, size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, size):
        yield table.slice(start, size)


class ContentEncoder(Protocol):
    """Turns metadata rows into content vectors, fitted once per run."""

    def fit(self, items: pa.Table) -> None: ...

    def encode(self, items: pa.Table) -> np.ndarray:
        """(rows, dim) float32; a row of NaN for an item the encoder has no vector for."""
        ...


class BuiltinEncoder:
    """TF-IDF text, one-hot categoricals and standardised numerics, reduced by truncated SVD."""

    def __init__(self, source: ContentSourceConfig, config: ContentConfig):
        self.source = source
        self.config = config
        self._text: Any = None
        self._categorical: Any = None
        self._numeric_mean: np.ndarray | None = None
        self._numeric_scale: np.ndarray | None = None
        self._svd: Any = None

    def _texts(self, items: pa.Table) -> list[str]:
        columns = [items.column(name).to_pylist() for name in self.source.text_columns]
        return [" ".join(str(part or "") for part in parts) for parts in zip(*columns, strict=True)]

    def _categories(self, items: pa.Table) -> np.ndarray:
        return np.column_stack(
            [
                np.asarray(items.column(name).to_pylist(), dtype=object)
                for name in self.source.categorical_columns
            ]
        )

    def _numbers(self, items: pa.Table) -> np.ndarray:
        return np.column_stack([_parse_floats(items.column(name)) for name in self.source.numeric_columns])

    def _blocks(self, items: pa.Table) -> sp.csr_matrix:
        from sklearn.preprocessing import normalize

        blocks: list[sp.csr_matrix] = []
        if self._text is not None:
            blocks.append(self._text.transform(self._texts(items)))
        if self._categorical is not None:
            blocks.append(sp.csr_matrix(self._categorical.transform(self._categories(items))))
        if self._numeric_mean is not None and self._numeric_scale is not None:
            numbers = self._numbers(items)
            numbers = np.where(np.isfinite(numbers), numbers, self._numeric_mean)
            blocks.append(sp.csr_matrix((numbers - self._numeric_mean) / self._numeric_scale))
        # Each block weighs the same whatever its width: 20 000 words must not drown 19 genre flags.
        return sp.hstack([normalize(block) for block in blocks]).tocsr()

    def fit(self, items: pa.Table) -> None:
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.preprocessing import OneHotEncoder

        if self.source.text_columns:
            self._text = TfidfVectorizer(
                max_features=self.config.max_text_features, sublinear_tf=True, dtype=np.float32
            )
            try:
                self._text.fit(self._texts(items))
            except ValueError:  # no word at all in the text columns: the other blocks carry the items
                self._text = None
        if self.source.categorical_columns:
            self._categorical = OneHotEncoder(handle_unknown="ignore", max_categories=1000)
            self._categorical.fit(self._categories(items))
        if self.source.numeric_columns:
            numbers = self._numbers(items)
            self._numeric_mean = np.nan_to_num(np.nanmean(numbers, axis=0)) if len(numbers) else np.zeros(0)
            spread = np.nan_to_num(np.nanstd(numbers, axis=0))
            self._numeric_scale = np.where(spread > 0, spread, 1.0)
        features = self._blocks(items)
        components = min(self.config.dim, features.shape[1] - 1, features.shape[0] - 1)
        if components < 1:
            raise ContentError("item metadata yields fewer than two features: name more content columns")
        self._svd = TruncatedSVD(n_components=components, random_state=0).fit(features)

    def encode(self, items: pa.Table) -> np.ndarray:
        reduced = self._svd.transform(self._blocks(items)).astype(np.float32)
        vectors = np.zeros((items.num_rows, self.config.dim), dtype=np.float32)
        vectors[:, : reduced.shape[1]] = reduced
        return vectors


class PrecomputedEncoder:
    """Vectors produced elsewhere, checked for width, finiteness and coverage before use."""

    def __init__(self, config: ContentConfig):
        assert config.precomputed is not None
        self.settings = config.precomputed
        self.dim = config.dim
        self._vectors: dict[str, int] = {}
        self._matrix = np.empty((0, config.dim), dtype=np.float32)

    def fit(self, items: pa.Table) -> None:
        path = self.settings.path
        if not path.exists():
            raise ContentError(f"content.precomputed.path {path} does not exist")
        table = pq.read_table(path, columns=[self.settings.id_column, self.settings.vector_column])
        vectors = table.column(self.settings.vector_column).combine_chunks()
        lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != self.dim)
        if len(wrong):
            raise ContentError(
                f"content.precomputed.path {path}: {len(wrong)} of {len(lengths)} vectors do not have "
                f"content.dim={self.dim} values (the first has {int(lengths[wrong[0]])})"
            )
        matrix = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, self.dim)
        broken = int((~np.isfinite(matrix).all(axis=1)).sum())
        if broken:
            raise ContentError(
                f"content.precomputed.path {path}: {broken} vectors hold NaN or infinite values"
            )
        ids = [str(value) for value in table.column(self.settings.id_column).to_pylist()]
        self._vectors = {item: row for row, item in enumerate(ids)}
        self._matrix = matrix
        wanted = items.column(ITEM_ID).to_pylist()
        covered = sum(1 for item in wanted if item in self._vectors) / max(len(wanted), 1)
        if covered < self.settings.min_coverage:
            raise ContentError(
                f"content.precomputed.path {path} has vectors for {covered:.1%} of the metadata's items, "
                f"below content.precomputed.min_coverage={self.settings.min_coverage:.0%}"
            )

    def encode(self, items: pa.Table) -> np.ndarray:
        rows = np.array([self._vectors.get(item, -1) for item in items.column(ITEM_ID).to_pylist()])
        vectors = np.full((len(rows), self.dim), np.nan, dtype=np.float32)
        vectors[rows >= 0] = self._matrix[rows[rows >= 0]]
        return vectors


def folder_sha256(directory: Path) -> str:
    """One hash over a folder's files (relative names and their sha256), in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory).as_posix()}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


class SentenceEncoder:
    """A sentence-transformers model from a local folder (the ``sentence`` extra); never downloads."""

    def __init__(self, source: ContentSourceConfig, config: ContentConfig):
        assert config.sentence is not None
        self.source = source
        self.settings = config.sentence
        self._model: Any = None

    def fit(self, items: pa.Table) -> None:
        folder = self.settings.model_dir
        if not folder.is_dir():
            raise ContentError(f"content.sentence.model_dir {folder} is not a folder")
        found = folder_sha256(folder)
        if found != self.settings.sha256:
            raise ContentError(
                f"content.sentence.model_dir {folder} hashes to {found}, not content.sentence.sha256"
            )
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ContentError(
                "content.encoder=sentence needs sentence-transformers: "
                "pip install 'recsys-pipeline[sentence]'"
            ) from None
        self._model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    def encode(self, items: pa.Table) -> np.ndarray:
        columns = [items.column(name).to_pylist() for name in self.source.text_columns]
        texts = [" ".join(str(part or "") for part in parts) for parts in zip(*columns, strict=True)]
        return np.asarray(
            self._model.encode(texts, batch_size=self.settings.batch_size, show_progress_bar=False),
            dtype=np.float32,
        )


def encoder_for(config: ContentConfig) -> ContentEncoder:
    assert config.source is not None
    if config.encoder == "precomputed":
        return PrecomputedEncoder(config)
    if config.encoder == "sentence":
        return SentenceEncoder(config.source, config)
    return BuiltinEncoder(config.source, config)


def encode_items(items: pa.Table, config: ContentConfig) -> tuple[np.ndarray, np.ndarray]:
    """(row positions in ``items`` that got a vector, their content vectors): the encoder is fitted
    on a seeded sample of at most ``fit_sample`` items, then applied ``batch_items`` at a time."""
    encoder = encoder_for(config)
    sample = items
    if items.num_rows > config.fit_sample:
        picked = np.sort(np.random.default_rng(0).choice(items.num_rows, config.fit_sample, replace=False))
        sample = items.take(pa.array(picked))
    encoder.fit(sample)
    vectors = np.concatenate(
        [encoder.encode(batch) for batch in batches(items, config.batch_items)]
        or [np.empty((0, config.dim), dtype=np.float32)]
    )
    present = np.isfinite(vectors).all(axis=1)
    return np.flatnonzero(present), vectors[present]


@dataclass(frozen=True)
class ContentMap:
    """A linear map from content vectors to item factors: ``(content - content_mean) @ weights + bias``."""

    weights: np.ndarray  # (content dim, factors)
    content_mean: np.ndarray  # (content dim,)
    bias: np.ndarray  # (factors,)
    alpha: float
    r2: float  # on held-out warm items
    cosine: float  # mean cosine between mapped and actual factors, held-out warm items

    def apply(self, content: np.ndarray) -> np.ndarray:
        return ((content - self.content_mean) @ self.weights + self.bias).astype(np.float32)

    @property
    def metrics(self) -> dict[str, float]:
        return {"content_map_r2": self.r2, "content_map_cosine": self.cosine, "content_map_alpha": self.alpha}


def _ridge(content: np.ndarray, factors: np.ndarray, alpha: float) -> ContentMap:
    content_mean, bias = content.mean(axis=0), factors.mean(axis=0)
    centred = (content - content_mean).astype(np.float64)
    gram = centred.T @ centred + alpha * np.eye(centred.shape[1])
    weights = np.linalg.solve(gram, centred.T @ (factors - bias))
    return ContentMap(weights, content_mean, bias, alpha, math.nan, math.nan)


def r2_score(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Share of the factors' variance (summed over dimensions) the prediction explains."""
    total = float(((actual - actual.mean(axis=0)) ** 2).sum())
    return 1.0 - float(((actual - predicted) ** 2).sum()) / total if total > 0 else 0.0


def mean_cosine(predicted: np.ndarray, actual: np.ndarray) -> float:
    norms = np.linalg.norm(predicted, axis=1) * np.linalg.norm(actual, axis=1)
    return float(np.mean(np.sum(predicted * actual, axis=1) / np.maximum(norms, 1e-12)))


def fit_content_map(content: np.ndarray, factors: np.ndarray, config: ContentMapConfig) -> ContentMap:
    """Ridge regression (closed form) from warm items' content vectors to their factors.

    ``alpha`` is chosen on a held-out share of the warm items; the map is then refitted on all of
    them and reports the held-out fit of the chosen alpha.
    """
    if len(content) < 10:
        raise ContentError(
            f"only {len(content)} items have both content and a collaborative vector: too few to fit "
            "the content map"
        )
    order = np.random.default_rng(config.seed).permutation(len(content))
    held = order[: max(1, int(len(content) * config.validation_share))]
    fitted = order[len(held) :]
    scored = []
    for alpha in config.alphas:
        predicted = _ridge(content[fitted], factors[fitted], alpha).apply(content[held])
        scored.append((r2_score(predicted, factors[held]), mean_cosine(predicted, factors[held]), alpha))
    r2, cosine, alpha = max(scored)
    full = _ridge(content, factors, alpha)
    return ContentMap(full.weights, full.content_mean, full.bias, alpha, r2, cosine)


def check_map_fit(content_map: ContentMap, min_r2: float) -> None:
    if content_map.r2 < min_r2:
        raise ContentError(
            f"the content map explains {content_map.r2:.3f} of held-out item factors' variance, below "
            f"content.map.min_r2={min_r2}: the metadata says too little about what users do"
        )


def with_content_vectors(
    embeddings: Embeddings,
    content_idx: np.ndarray,
    mapped: np.ndarray,
    interaction_counts: np.ndarray,
    hybrid_half_count: float | None,
) -> Embeddings:
    """The item vectors served: collaborative ones, plus mapped content vectors (flagged cold) for
    items that have content but no collaborative vector. With ``hybrid_half_count`` h, an item with
    n interactions and both vectors blends them, the content one weighing h / (h + n).

    ``mapped`` has the learned dimensions only: a blend keeps the item's popularity prior, a cold
    item gets none (0: it has no popularity to speak of)."""
    warm = np.isin(content_idx, embeddings.item_idx)
    item_factors = embeddings.item_factors.copy()
    width = mapped.shape[1]
    if hybrid_half_count is not None and warm.any():
        rows = embeddings.item_rows(content_idx[warm])
        counts = interaction_counts[content_idx[warm]].astype(np.float32)
        weight = (hybrid_half_count / (hybrid_half_count + counts))[:, None]
        item_factors[rows, :width] = (1 - weight) * item_factors[rows, :width] + weight * mapped[warm]
    cold = content_idx[~warm]
    cold_factors = np.zeros((len(cold), item_factors.shape[1]), dtype=np.float32)
    cold_factors[:, :width] = mapped[~warm]
    return Embeddings(
        embeddings.user_idx,
        embeddings.user_factors,
        np.concatenate([embeddings.item_idx, cold]),
        np.concatenate([item_factors, cold_factors]).astype(np.float32),
        cold_item_idx=np.sort(cold),
        prior_dims=embeddings.prior_dims,
    )
