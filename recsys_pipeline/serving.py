"""Load a published bundle and answer recommendation and similar-item queries.

Output rows carry ``rank`` (1 = best), ``item_id`` and ``score`` plus the query key
(``user_id`` for recommendations, ``query_item_id`` for similar items), in the
dataset's original IDs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from mlflow.pyfunc import PythonModel

from recsys_pipeline.bundle import Bundle
from recsys_pipeline.config import AlsConfig, IndexConfig, RegistryConfig, load_config
from recsys_pipeline.embeddings import presence_mask
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.index import ScannIndex, search_params
from recsys_pipeline.ranking import dot_top_k, first_unseen, popular_items
from recsys_pipeline.refresh import SessionSolver
from recsys_pipeline.registry import CHAMPION, Registry

RESULT_COLUMNS = ["rank", "item_id", "score"]
DEFAULT_K = 10
# Requests larger than this are refused: one answer holds at most MAX_K items per row and
# MAX_BATCH_ROWS rows, so a single call cannot ask the service for an unbounded response.
MAX_K = 1000
MAX_BATCH_ROWS = 1000
# How much a known user's recommendations for a session follow the session rather than their stored
# vector (1: the session alone).
DEFAULT_SESSION_WEIGHT = 0.5
# Similar items are found by an exact scan in catalogues smaller than this, by an index above.
SIMILAR_EXACT_BELOW = IndexConfig().brute_force_below
# A REST body above this is refused before it is parsed: 1000 rows of an id and a k take about 50 kB.
MAX_BODY_BYTES = 1 << 20


class BadRequestError(RecsysError):
    """A request the service cannot answer as asked (a bad ``k``, a row without a key)."""


def checked_k(value: Any) -> int:
    """``k`` as a whole number from 1 to ``MAX_K`` (missing: ``DEFAULT_K``), else :class:`BadRequestError`."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return DEFAULT_K
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadRequestError(f"k must be a whole number from 1 to {MAX_K}, got {value!r}")
    # Range first: float() of a 400-digit integer overflows.
    if not 1 <= value <= MAX_K or not float(value).is_integer():
        raise BadRequestError(f"k must be a whole number from 1 to {MAX_K}, got {str(value)[:20]!r}")
    return int(value)


class UnknownIdError(RecsysError, KeyError):
    """An id the published version has never seen."""

    def __str__(self) -> str:
        return str(self.args[0])


class Recommender:
    """In-process access to one published version; loads maps, vectors and index once."""

    def __init__(self, bundle: Bundle):
        self.meta = bundle.meta
        self.user_ids = bundle.ids("users")
        self.item_ids = bundle.ids("items")
        # An erased user keeps an index without an id (a tombstone): nothing looks it up.
        self.user_lookup = {user_id: idx for idx, user_id in enumerate(self.user_ids) if user_id is not None}
        self.item_lookup = {item_id: idx for idx, item_id in enumerate(self.item_ids)}
        embeddings = bundle.embeddings()
        self.user_vectors = embeddings.dense_users(len(self.user_ids))
        self.has_user_vector = presence_mask(embeddings.user_idx, len(self.user_ids))
        # Similar items by the learned dimensions (the popularity prior's would pull every item
        # towards the most popular ones), normalised once per loaded version, not per request.
        geometry = embeddings.learned().dense_items(len(self.item_ids))
        self.item_directions = geometry / np.maximum(np.linalg.norm(geometry, axis=1, keepdims=True), 1e-12)
        self.has_item_vector = presence_mask(embeddings.item_idx, len(self.item_ids))
        self.index = bundle.index()
        # Similar items: an exact cosine scan is cheap for a small catalogue; above the size where the
        # pipeline's own index stops searching exactly, a ScaNN index over the directions, built once
        # as the version loads, keeps a request's cost off the catalogue's size.
        warm = np.flatnonzero(self.has_item_vector)
        params = search_params(len(warm), IndexConfig())
        self.similar_index = (
            ScannIndex.build(warm, self.item_directions[warm], params, DEFAULT_K)
            if len(warm) >= SIMILAR_EXACT_BELOW
            else None
        )
        user_idx, item_idx = bundle.history()
        self.history = sp.csr_matrix(
            (np.ones(len(user_idx), dtype=np.int8), (user_idx, item_idx)),
            shape=(len(self.user_ids), len(self.item_ids)),
        )
        self.popularity = bundle.popularity()
        self.popular = popular_items(self.popularity)
        self.popular_scores = self.popularity[self.popular].astype(np.float32)
        trained = bundle.trained_params(AlsConfig())
        self.sessions = SessionSolver(geometry, trained, bundle.item_weights())
        # The popularity prior's user side is one constant per version (see als.with_popularity_prior).
        self.prior_tail = np.full(embeddings.prior_dims, trained.popularity_weight, dtype=np.float32)
        self.precomputed_lists = PrecomputedLists.read(bundle.recommendations_file)

    @classmethod
    def from_path(cls, path: Path) -> Recommender:
        return cls(Bundle(path))

    @classmethod
    def from_registry(cls, alias: str = CHAMPION, config: RegistryConfig | None = None) -> Recommender:
        _, bundle = Registry(config or load_config()).download(alias)
        return cls(bundle)

    def _user_idx(self, user_id: str) -> int | None:
        return self.user_lookup.get(str(user_id))

    def recommend(self, user_id: str, k: int = DEFAULT_K, unknown: str = "error") -> pd.DataFrame:
        """Top-k unseen items for a user (k from 1 to ``MAX_K``).

        A user without a vector (new, or no training data) gets the most popular unseen
        items. A user id never seen raises :class:`UnknownIdError` unless ``unknown="popular"``.
        """
        return self.frame("user_id", user_id, *self.recommend_ranked(user_id, k, unknown))

    def recommend_ranked(
        self, user_id: str, k: int = DEFAULT_K, unknown: str = "error"
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`recommend`'s answer as (item indices, scores), best first."""
        k = checked_k(k)
        idx = self._user_idx(user_id)
        if idx is None and unknown == "error":
            raise UnknownIdError(f"unknown user id {user_id!r}: not in this version's ID map")
        seen = self.history[idx].indices if idx is not None else np.empty(0, dtype=np.int64)
        if idx is None or not self.has_user_vector[idx]:
            # Only the head can be needed: k items plus what the user has seen.
            ranked, ranked_scores = self.popular[: k + len(seen)], self.popular_scores[: k + len(seen)]
        else:
            found, found_scores = self.index.search(self.user_vectors[idx][None, :], k + len(seen))
            ranked, ranked_scores = found[0], found_scores[0]
        return first_unseen(ranked, ranked_scores, seen, k)

    def for_session(
        self,
        recent_item_ids: list[str],
        k: int = DEFAULT_K,
        weights: list[float] | None = None,
        user_id: str | None = None,
        session_weight: float = DEFAULT_SESSION_WEIGHT,
    ) -> pd.DataFrame:
        """Top-k items for a session: the user vector solved from its recent items at request time
        (ids this version does not know are left out), blended with a known user's stored vector as
        ``session_weight`` says (1: the session alone). None of the session's items, nor the user's
        history, are recommended. With no known item, the answer is :meth:`recommend`'s (the popular
        list for an unknown user or none)."""
        ranked = self.for_session_ranked(recent_item_ids, k, weights, user_id, session_weight)
        return self.frame("user_id", "" if user_id is None else user_id, *ranked)

    def for_session_ranked(
        self,
        recent_item_ids: list[str],
        k: int = DEFAULT_K,
        weights: list[float] | None = None,
        user_id: str | None = None,
        session_weight: float = DEFAULT_SESSION_WEIGHT,
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`for_session`'s answer as (item indices, scores), best first."""
        k = checked_k(k)
        if not 0 <= session_weight <= 1:
            raise BadRequestError(f"session_weight must be from 0 to 1, got {session_weight!r}")
        if not isinstance(recent_item_ids, (list, tuple, np.ndarray)):
            raise BadRequestError("recent_item_ids must be a list of item ids")
        if len(recent_item_ids) > MAX_K:
            raise BadRequestError(f"{len(recent_item_ids)} recent items: send at most {MAX_K}")
        asked = np.ones(len(recent_item_ids)) if weights is None else weights
        try:
            given = np.asarray(asked, dtype=np.float64)
        except (TypeError, ValueError):
            given = np.empty(0)  # refused just below
        if given.shape != (len(recent_item_ids),) or not np.all(np.isfinite(given)) or np.any(given <= 0):
            raise BadRequestError("weights must be positive numbers, one per recent item id")
        positions = [self.item_lookup.get(str(item_id)) for item_id in recent_item_ids]
        known = np.array([idx is not None for idx in positions], dtype=bool)
        item_idx = np.array([idx for idx in positions if idx is not None], dtype=np.int64)
        if not len(item_idx):
            return self.recommend_ranked("" if user_id is None else user_id, k, unknown="popular")
        vector = self.sessions.solve(item_idx, given[known])
        user_idx = None if user_id is None else self._user_idx(user_id)
        if user_idx is not None and self.has_user_vector[user_idx]:
            stored = self.user_vectors[user_idx][: len(vector)]
            vector = (1 - session_weight) * stored + session_weight * vector
        query = np.concatenate([vector, self.prior_tail]).astype(np.float32)
        history = self.history[user_idx].indices if user_idx is not None else np.empty(0, dtype=np.int64)
        seen = np.union1d(item_idx, history).astype(np.int64)
        found, found_scores = self.index.search(query[None, :], k + len(seen))
        return first_unseen(found[0], found_scores[0], seen, k)

    def precomputed(self, user_id: str) -> pd.DataFrame:
        """The list the batch stage precomputed for an active user (empty for any other user)."""
        return self.precomputed_lists.of(str(user_id))

    def similar(self, item_id: str, k: int = DEFAULT_K) -> pd.DataFrame:
        """The k items (1 to ``MAX_K``) with the highest cosine to the item's vector, itself excluded."""
        return self.frame("query_item_id", item_id, *self.similar_ranked(item_id, k))

    def similar_ranked(self, item_id: str, k: int = DEFAULT_K) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`similar`'s answer as (item indices, cosines), best first."""
        k = checked_k(k)
        idx = self.item_lookup.get(str(item_id))
        if idx is None:
            raise UnknownIdError(f"unknown item id {item_id!r}: not in this version's ID map")
        if not self.has_item_vector[idx]:
            raise UnknownIdError(f"item id {item_id!r} has no vector in this version (no training data)")
        if self.similar_index is not None:
            found, cosines = self.similar_index.search(self.item_directions[idx][None, :], k + 1)
            return first_unseen(found[0], cosines[0], np.array([idx]), k)
        allowed = self.has_item_vector.copy()
        allowed[idx] = False
        best, cosine = dot_top_k(
            self.item_directions[idx][None, :],
            self.item_directions,
            min(k, int(allowed.sum())),
            allowed=allowed,
        )
        return best[0], cosine[0]

    def frame(self, key: str, value: str, items: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(
            {
                key: str(value),
                "rank": np.arange(1, len(items) + 1),
                "item_id": self.item_ids[items],
                "score": np.asarray(scores, dtype=np.float64),
            }
        )


class PrecomputedLists:
    """The batch stage's lists (``user_id, rank, item_id, score``) in memory, sorted by user, each found
    by one dictionary lookup."""

    def __init__(self, table: pa.Table):
        table = table.sort_by([("user_id", "ascending"), ("rank", "ascending")])
        users = table.column("user_id").to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.empty(0, int)
        ends = np.r_[starts[1:], len(users)]
        self.bounds = {str(users[start]): (int(start), int(end)) for start, end in zip(starts, ends)}
        self.ranks = table.column("rank").to_numpy()
        self.items = table.column("item_id").to_numpy(zero_copy_only=False)
        self.scores = table.column("score").to_numpy().astype(np.float64)

    @classmethod
    def read(cls, path: Path) -> PrecomputedLists:
        if not path.is_file():
            return cls(pa.table({"user_id": [], "rank": [], "item_id": [], "score": []}))
        return cls(pq.read_table(path, columns=["user_id", "rank", "item_id", "score"]))

    def of(self, user_id: str) -> pd.DataFrame:
        start, end = self.bounds.get(user_id, (0, 0))
        return pd.DataFrame(
            {
                "user_id": user_id,
                "rank": self.ranks[start:end],
                "item_id": self.items[start:end],
                "score": self.scores[start:end],
            }
        )


def verified_pyfunc(alias: str = CHAMPION, config: RegistryConfig | None = None) -> Any:
    """The registered model behind ``alias`` as an MLflow pyfunc, loaded only once every file of its
    local copy matched the manifest whose sha256 the registry holds; then MLflow imports its code.
    Service authors call this, not ``mlflow.pyfunc.load_model("models:/...")``, which imports the
    stored code before anything is checked."""
    import mlflow

    _, model = Registry(config or load_config()).alias_model(alias)
    return mlflow.pyfunc.load_model(str(model))


def model_signature() -> Any:
    """Input: ``user_id`` (recommend) or ``item_id`` (similar) strings or ``recent_item_ids`` (a
    session, with ``user_id`` if known), optional ``k`` (1 to ``MAX_K``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import AnyType

    return ModelSignature(
        inputs=Schema(
            [
                ColSpec("string", "user_id", required=False),
                ColSpec("string", "item_id", required=False),
                # Any type: MLflow would otherwise truncate k=2.5 to 2 before the model could refuse it.
                ColSpec(AnyType(), "k", required=False),
                # A session: recent item ids (and optionally one positive weight each).
                ColSpec(AnyType(), "recent_item_ids", required=False),
                ColSpec(AnyType(), "weights", required=False),
            ]
        ),
        outputs=Schema(
            [
                ColSpec("string", "user_id", required=False),
                ColSpec("string", "query_item_id", required=False),
                ColSpec("long", "rank"),
                ColSpec("string", "item_id"),
                ColSpec("double", "score"),
            ]
        ),
    )


class RecsysPyfunc(PythonModel):
    """The registered model: rows with ``user_id`` get recommendations, rows with ``item_id`` similar items.

    Unknown users get the most popular items (a service should always answer). A request with
    an unknown item, a bad ``k``, a row without a key or more than ``MAX_BATCH_ROWS`` rows is
    refused as a whole with one short reason per bad row (HTTP 400 from ``mlflow models serve``).
    """

    def load_context(self, context: Any) -> None:
        bundle = Bundle(Path(context.artifacts["bundle"]))
        bundle.check_files()
        self.recommender = Recommender(bundle)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException

        if len(model_input) == 0:
            # MLflow's JSON parsing turns rows without known columns (``[{}]``) into no rows at all.
            raise MlflowException.invalid_parameter_value(
                "the request has no usable rows: each row needs a user_id or an item_id"
            )
        if len(model_input) > MAX_BATCH_ROWS:
            raise MlflowException.invalid_parameter_value(
                f"{len(model_input)} rows in one request: send at most {MAX_BATCH_ROWS}"
            )
        frames, problems = [], []
        for number, row in enumerate(model_input.to_dict(orient="records")):
            try:
                frames.append(self.recommender.frame(*answer_row(self.recommender, row)))
            except RecsysError as error:
                problems.append(f"row {number}: {error}")
        if problems:
            raise MlflowException.invalid_parameter_value("; ".join(problems))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=RESULT_COLUMNS)


def answer_row(
    recommender: Recommender, row: dict[str, Any], session_weight: float = DEFAULT_SESSION_WEIGHT
) -> tuple[str, str, np.ndarray, np.ndarray]:
    """One request row's answer as (key column, its value, item indices, scores): ``recent_item_ids``
    asks for a session's list (of ``user_id`` if given), else ``user_id`` for the user's list (the
    popular one for an unknown user), else ``item_id`` for similar items; ``k`` items each."""
    k = checked_k(row.get("k"))
    user_id = str(row["user_id"]) if _present(row.get("user_id")) else None
    if _present(row.get("recent_item_ids")):
        weights = row["weights"] if _present(row.get("weights")) else None
        ranked = recommender.for_session_ranked(row["recent_item_ids"], k, weights, user_id, session_weight)
        return "user_id", user_id or "", *ranked
    if user_id is not None:
        return "user_id", user_id, *recommender.recommend_ranked(user_id, k, unknown="popular")
    if _present(row.get("item_id")):
        item_id = str(row["item_id"])
        return "query_item_id", item_id, *recommender.similar_ranked(item_id, k)
    raise BadRequestError("each row needs a user_id or an item_id (or recent_item_ids for a session)")


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))


class BodySizeLimit:
    """ASGI middleware refusing a request body over ``limit`` bytes with HTTP 413 before the app
    sees any of it: MLflow's scoring server parses the whole body before the pyfunc can count rows.
    A declared ``Content-Length`` is checked at once; a chunked body is counted as it arrives."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send)
                return
            more = message.get("more_body", False)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return cast(dict[str, Any], await receive())
            delivered = True
            return body

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any) -> None:
        payload = json.dumps(
            {
                "error_code": "INVALID_PARAMETER_VALUE",
                "message": f"the request body is over {self.limit} bytes: send at most {MAX_BATCH_ROWS} rows",
            }
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
