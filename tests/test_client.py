"""The verified client services embed (issue #33): a live swap that no request notices, a tampered
version that is never served, and session vectors that are the fold-in's least-squares update."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recsys_pipeline import serving
from recsys_pipeline.als import weighted
from recsys_pipeline.bundle import Bundle, BundleIntegrityError, write_bundle
from recsys_pipeline.client import RecsysClient
from recsys_pipeline.registry import Registry
from recsys_pipeline.rest import InvocationsApp
from recsys_pipeline.serving import Recommender
from recsys_pipeline.stages.publish import run_promotion, run_publish
from tests.conftest import copy_run
from tests.reliability.test_verified_bundles import stored_model_dir, swap_first_two_rows


@pytest.fixture
def two_versions(own_weekly_run):
    """Version 1 is champion; version 2 (a later week whose users' vectors differ) is registered, not
    promoted. Returns (config, the user asked about, version 1's answer, version 2's answer)."""
    first = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, first)
    later = copy_run(own_weekly_run, "1998-04-23", "1998-04-30")
    served = later.artifacts.served
    embeddings, losses, params = served.embeddings(), served.training_losses(), served.trained_params()
    shutil.rmtree(served.root)
    # Users' vectors reversed in order: every list changes, and so would a half-swapped answer.
    served.write(
        replace(embeddings, user_factors=embeddings.user_factors[::-1].copy()),
        losses,
        params,
        served.item_weights(),
    )
    second = run_publish(later)
    config = own_weekly_run.config
    registry = Registry(config)
    user = Recommender(registry.version_bundle(first)).user_ids[0]
    answers = [Recommender(registry.version_bundle(v)).recommend(user, 10) for v in (first, second)]
    assert not answers[0]["item_id"].equals(answers[1]["item_id"])
    return config, user, first, second, answers


def test_a_new_champion_is_swapped_in_under_a_request_loop_without_a_failed_or_mixed_answer(
    two_versions,
) -> None:
    config, user, first, second, (old, new) = two_versions
    client = RecsysClient(config)
    assert client.version == first
    answered: list[pd.DataFrame] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def requests() -> None:
        while not stop.is_set():
            try:
                answered.append(client.recommend(user, 10))
            except Exception as error:  # every failure counts, whatever it is
                errors.append(error)

    loop = threading.Thread(target=requests)
    loop.start()
    try:
        Registry(config).promote(second, "test: a newer week")
        with client.watch(interval_s=3600) as watcher:
            watcher.wake()
            for _ in range(600):
                if client.version == second:
                    break
                threading.Event().wait(0.1)
        answered_before = len(answered)
        while len(answered) < answered_before + 5:
            threading.Event().wait(0.01)
    finally:
        stop.set()
        loop.join()
    assert client.version == second and not errors
    kinds = [version_of(answer, old, new) for answer in answered]
    assert -1 not in kinds, "an answer matched neither version"
    assert kinds[0] == 0 and kinds[-1] == 1 and kinds == sorted(kinds)  # old until the swap, then new


def asgi(app: InvocationsApp, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    """One request to an ASGI app in process: (status, JSON body)."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path, "headers": []}, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"])


def version_of(answer: pd.DataFrame, old: pd.DataFrame, new: pd.DataFrame) -> int:
    """0 for the old version's answer, 1 for the new one's, -1 for neither."""
    return 0 if answer.equals(old) else 1 if answer.equals(new) else -1


def test_a_tampered_new_version_is_never_served_and_the_old_one_stays(two_versions) -> None:
    config, user, first, second, (old, _) = two_versions
    client = RecsysClient(config)
    swap_first_two_rows(
        stored_model_dir(config, second) / "artifacts" / "bundle" / "id_maps" / "users.parquet"
    )
    shutil.rmtree(config.state_home / "cache")  # its verified copy, cached when the fixture read it
    Registry(config).promote(second, "test: a tampered newer week")
    # What recsys serve answers a DAG that tells it of the new champion: still the old version.
    status, body = asgi(InvocationsApp(client), "POST", "/refresh")
    assert status == 503 and body["version"] == first and "does not match" in body["error"]
    assert client.refresh() is False
    assert isinstance(client.last_error, BundleIntegrityError)
    assert client.version == first
    assert client.recommend(user, 10).equals(old)
    with pytest.raises(BundleIntegrityError):
        RecsysClient(config)  # a service starting now gets no version at all, not the tampered one


def test_similar_items_above_the_exact_scan_size_come_from_an_index_close_to_the_scan(
    own_weekly_run, monkeypatch
) -> None:
    bundle = Bundle(write_bundle(own_weekly_run, {}))
    exact = Recommender(bundle)
    monkeypatch.setattr(serving, "SIMILAR_EXACT_BELOW", 100)
    indexed = Recommender(bundle)
    assert exact.similar_index is None and indexed.similar_index is not None
    items = exact.item_ids[np.flatnonzero(exact.has_item_vector)[:50]]
    found = [
        (set(exact.similar(item, 10)["item_id"]), indexed.similar(item, 10)["item_id"].tolist())
        for item in items
    ]
    assert all(
        item not in listed and len(listed) == 10 for item, (_, listed) in zip(items, found, strict=True)
    )
    assert np.mean([len(truth & set(listed)) / 10 for truth, listed in found]) >= 0.9


def test_a_session_vector_is_the_fold_ins_least_squares_solve(own_weekly_run) -> None:
    from implicit.cpu.als import AlternatingLeastSquares

    recommender = Recommender(Bundle(write_bundle(own_weekly_run, {})))
    trained = own_weekly_run.artifacts.served.trained_params()
    items = recommender.sessions.items
    session = np.array([5, 17, 17, 260, 1])
    weights = np.array([1.0, 0.5, 2.0, 1.0, 3.0])
    solved = recommender.sessions.solve(session, weights)

    model = AlternatingLeastSquares(
        factors=trained.factors, regularization=trained.regularization, alpha=trained.alpha
    )
    model.item_factors = items.astype(np.float32)
    model.user_factors = np.zeros((1, trained.factors), dtype=np.float32)
    row = sp.csr_matrix((weights, (np.zeros(len(session)), session)), shape=(1, len(items)))
    row.sum_duplicates()
    # The session is weighted as training weighted every user's row (BM25 under the default weighting).
    assert trained.weighting == "bm25" and recommender.sessions.item_weights is not None
    expected = model.recalculate_user(0, weighted(row, trained, recommender.sessions.item_weights))
    np.testing.assert_allclose(solved, np.ravel(expected), atol=1e-4)

    answer = recommender.for_session([recommender.item_ids[i] for i in session], k=10)
    assert len(answer) == 10 and not set(answer["item_id"]) & set(recommender.item_ids[session])
    known_user = recommender.user_ids[0]
    stored = recommender.recommend(known_user, 10)
    assert recommender.for_session(["never-seen"], 10, user_id=known_user).equals(stored)
