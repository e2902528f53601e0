"""The synthetic generator's oracle: each user's exact probability of choosing each item."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsys_pipeline.als import train
from recsys_pipeline.config import AlsConfig
from recsys_pipeline.evaluate import EvaluationSet, scores
from recsys_pipeline.ranking import exclude, pad, top_k
from recsys_pipeline.synthetic import SyntheticSpec, SyntheticWorld, sample_events

pytestmark = pytest.mark.unit

SPEC = SyntheticSpec(events=150_000, users=3_000, items=1_500, seed=5)


def test_choice_probabilities_match_the_generators_own_draws() -> None:
    """For a few users, the oracle's distribution over items is the one their simulated choices follow."""
    world = SyntheticWorld.of(SPEC)
    rng = np.random.default_rng(1)
    users = np.array([0, 17, 400])
    predicted = np.exp(world.choice_log_probability(users))
    draws = 200_000
    for row, user in enumerate(users):
        assert predicted[row].sum() == pytest.approx(1.0, abs=0.02)
        items, _ = world.choose(np.full(draws, user), rng)
        empirical = np.bincount(items, minlength=SPEC.items) / draws
        total_variation = 0.5 * np.abs(empirical - predicted[row]).sum()
        # Sampling noise alone gives about 0.02 here; ignoring taste (popularity alone) about 0.5.
        assert total_variation < 0.035, (user, total_variation)
        assert 0.5 * np.abs(empirical - world.item_probability).sum() > 0.4


def _split_last_choice(spec: SyntheticSpec) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(training counts, each user's last event held out when it is an item new to them)."""
    chunks = list(sample_events(spec))
    users = np.concatenate([chunk.users for chunk in chunks])
    items = np.concatenate([chunk.items for chunk in chunks])
    ts = np.concatenate([chunk.ts for chunk in chunks])
    order = np.lexsort((ts, users))
    users, items = users[order], items[order]
    last = np.r_[users[1:] != users[:-1], True]
    shape = (spec.users, spec.items)
    ones = np.ones(len(users), np.float32)
    train_part = sp.csr_matrix((ones[~last], (users[~last], items[~last])), shape=shape)
    holdout = sp.csr_matrix((ones[last], (users[last], items[last])), shape=shape)
    return train_part, holdout


def test_the_oracle_ranks_held_out_choices_above_popularity_and_a_trained_model() -> None:
    train_part, holdout = _split_last_choice(SPEC)
    evaluation = EvaluationSet.build(train_part, holdout, max_users=1_500, seed=0)
    world = SyntheticWorld.of(SPEC)
    log_probability = world.choice_log_probability(evaluation.users)
    exclude(log_probability, evaluation.seen)
    oracle_lists = pad(top_k(log_probability, 10)[0], 10)
    oracle = scores(oracle_lists, evaluation.relevant, 10, SPEC.items).per_user["ndcg_at_10"]
    popularity = evaluation.popularity_scores(10).per_user["ndcg_at_10"]
    embeddings, _ = train(train_part, AlsConfig(factors=16, regularization=10.0, alpha=2.0))
    model = evaluation.scores(embeddings, 10).per_user["ndcg_at_10"]
    assert oracle.mean() > 1.2 * popularity.mean()
    assert oracle.mean() > model.mean()
    # Paired: the oracle's per-user lead over each is not noise.
    for other in (popularity, model):
        lead = oracle - other
        assert lead.mean() > 2 * lead.std() / np.sqrt(len(lead))


def test_taste_strength_sets_how_far_the_best_ranking_beats_popularity() -> None:
    """At strength 0 choices follow popularity alone: the oracle's probabilities are popularity's."""
    world = SyntheticWorld.of(SyntheticSpec(users=50, items=300, taste_strength=0.0))
    predicted = np.exp(world.choice_log_probability(np.arange(5)))
    np.testing.assert_allclose(predicted, np.broadcast_to(world.item_probability, predicted.shape), rtol=1e-4)
