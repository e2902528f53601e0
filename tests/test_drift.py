from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import ortho_group

from recsys_pipeline.config import DriftConfig
from recsys_pipeline.drift import compare, jaccard_rows, plot, read_report, write_report
from recsys_pipeline.embeddings import Embeddings
from recsys_pipeline.validation import drift_summary_suite, item_drift_suite, validate_frames


def embeddings(seed: int = 0, users: int = 300, items: int = 400, dims: int = 12) -> Embeddings:
    """Low-rank structured factors: items in taste clusters, like a trained ALS model."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dims))
    item_factors = centres[rng.integers(0, 20, items)] + 0.3 * rng.normal(size=(items, dims))
    user_factors = centres[rng.integers(0, 20, users)] + 0.3 * rng.normal(size=(users, dims))
    return Embeddings(
        np.arange(users), user_factors.astype(np.float32), np.arange(items), item_factors.astype(np.float32)
    )


def rotated(e: Embeddings, seed: int = 1) -> Embeddings:
    rotation = ortho_group.rvs(e.item_factors.shape[1], random_state=seed).astype(np.float32)
    return Embeddings(e.user_idx, e.user_factors @ rotation, e.item_idx, e.item_factors @ rotation)


def shuffled(e: Embeddings, seed: int = 2) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(
        e.user_idx,
        e.user_factors[rng.permutation(len(e.user_idx))],
        e.item_idx,
        e.item_factors[rng.permutation(len(e.item_idx))],
    )


def test_a_rotated_copy_shows_no_drift() -> None:
    old = embeddings()
    metrics = compare(old, rotated(old), k=10, sample_items=400, sample_users=300).metrics
    assert metrics["drift_neighbour_overlap"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["drift_neighbour_retention"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["drift_aligned_cosine"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["drift_rec_overlap"] == pytest.approx(1.0, abs=1e-3)
    assert metrics["drift_norm_ks"] == pytest.approx(0.0, abs=1e-2)


def test_shuffled_vectors_show_large_drift() -> None:
    old = embeddings()
    metrics = compare(old, shuffled(old), k=10, sample_items=400, sample_users=300).metrics
    assert metrics["drift_neighbour_overlap"] < 0.2
    assert metrics["drift_neighbour_retention"] < 0.3
    assert metrics["drift_aligned_cosine"] < 0.5
    assert metrics["drift_rec_overlap"] < 0.3
    # The same vectors in another order: the norm distribution does not move.
    assert metrics["drift_norm_ks"] == pytest.approx(0.0, abs=1e-9)


def test_only_shared_ids_are_compared_and_factor_counts_may_differ() -> None:
    old = embeddings(dims=12)
    new = embeddings(dims=16, seed=5)
    new = Embeddings(new.user_idx + 100, new.user_factors, new.item_idx + 150, new.item_factors)
    report = compare(old, new, k=5, sample_items=100, sample_users=100)
    assert report.metrics["drift_shared_items"] == 250 and report.metrics["drift_shared_users"] == 200
    assert report.items["item_idx"].min() == 150


def test_drift_suites_pass_a_rotation_and_fail_a_shuffle_on_both_bounds(tmp_path: Path, make_config) -> None:
    config = make_config()
    old = embeddings()
    stable = compare(old, rotated(old), k=10, sample_items=400, sample_users=300)
    broken = compare(old, shuffled(old), k=10, sample_items=400, sample_users=300)
    plot(stable, tmp_path / "drift.png")
    assert (tmp_path / "drift.png").stat().st_size > 1000

    def failures(report, name):
        return validate_frames(
            tmp_path / name,
            {
                "item_drift": (report.items, item_drift_suite(config)),
                "drift_summary": (pd.DataFrame([report.metrics]), drift_summary_suite(config)),
            },
        )

    assert failures(stable, "stable") == []
    failed = {(f.suite, f.column) for f in failures(broken, "broken")}
    assert failed == {
        ("item_drift", "neighbour_retention"),
        ("item_drift", "aligned_cosine"),
        ("drift_summary", "drift_rec_overlap"),
    }
    strict = make_config(**{"drift.max_norm_ks": 0.0})
    loose_shift = Embeddings(old.user_idx, old.user_factors, old.item_idx, old.item_factors * 3)
    report = compare(old, loose_shift, k=10, sample_items=400, sample_users=300)
    upper = validate_frames(
        tmp_path / "upper",
        {
            "drift_summary": (pd.DataFrame([report.metrics]), drift_summary_suite(strict)),
        },
    )
    assert [(f.suite, f.column) for f in upper] == [("drift_summary", "drift_norm_ks")]


def test_near_tied_neighbours_trading_places_is_not_drift(tmp_path: Path, make_config) -> None:
    """A dense catalogue: items in tight groups, so each item's top-k neighbours are near-ties that
    a retrain's noise reorders. Similar-item lists churn (low Jaccard) while the geometry holds
    (high retention): the default bounds pass it, and a bound on Jaccard, when set, catches it."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 16))
    items = centres[rng.integers(0, 40, 4000)] + 0.05 * rng.normal(size=(4000, 16))
    users = centres[rng.integers(0, 40, 500)] + 0.3 * rng.normal(size=(500, 16))
    old = Embeddings(np.arange(500), users.astype(np.float32), np.arange(4000), items.astype(np.float32))
    retrained = rotated(
        Embeddings(
            old.user_idx,
            old.user_factors,
            old.item_idx,
            (items + 0.05 * rng.normal(size=items.shape)).astype(np.float32),
        )
    )
    report = compare(old, retrained, k=10, sample_items=500, sample_users=300)
    assert report.metrics["drift_neighbour_overlap"] < 0.3
    assert report.metrics["drift_neighbour_retention"] > 0.9
    suites = {"item_drift": (report.items, item_drift_suite(make_config()))}
    assert validate_frames(tmp_path / "default", suites) == []
    strict = {
        "item_drift": (report.items, item_drift_suite(make_config(**{"drift.min_neighbour_overlap": 0.3})))
    }
    assert [(f.suite, f.column) for f in validate_frames(tmp_path / "strict", strict)] == [
        ("item_drift", "neighbour_jaccard")
    ]


def test_jaccard_rows_is_the_set_jaccard_of_each_pair_of_lists() -> None:
    rng = np.random.default_rng(0)
    a = np.stack([rng.permutation(30)[:10] for _ in range(200)])
    b = np.stack([rng.permutation(30)[:10] for _ in range(200)])
    b[0] = a[0][::-1]  # same set, other order
    b[1] = np.arange(100, 110)  # nothing shared
    expected = [len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a, b, strict=True)]
    np.testing.assert_allclose(jaccard_rows(a, b), expected)
    assert jaccard_rows(a, b)[0] == 1.0 and jaccard_rows(a, b)[1] == 0.0


def test_a_kept_report_is_read_back_only_for_the_same_version_and_sampling(tmp_path: Path) -> None:
    rules = DriftConfig(k=10, sample_items=400, sample_users=300)
    old = embeddings()
    report = compare(old, shuffled(old), rules.k, rules.sample_items, rules.sample_users)
    write_report(report, tmp_path, "7", rules)
    kept = read_report(tmp_path, "7", rules)
    assert kept is not None and kept.metrics == report.metrics
    pd.testing.assert_frame_equal(kept.items, report.items)
    assert read_report(tmp_path, "8", rules) is None  # compared against another version
    assert read_report(tmp_path, "7", rules.model_copy(update={"sample_users": 100})) is None
    assert read_report(tmp_path / "missing", "7", rules) is None
