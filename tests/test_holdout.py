"""Each holdout strategy on a hand-made log gives the split it promises, and a holdout too small to
judge a model on fails the run before training, saying so."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from recsys_pipeline.interactions import HoldoutTooSmallError
from recsys_pipeline.runs import RunContext
from recsys_pipeline.stages.ingest import run_ingest
from recsys_pipeline.stages.interactions import run_interactions

START = datetime(2024, 1, 1, tzinfo=UTC)
END = START + timedelta(days=10)
NO_MIN_SUPPORT = {"interactions.min_item_interactions": 1, "interactions.min_user_interactions": 1}

# (user, item, day): ann is active throughout, bob stopped early, cat has a single item.
LOG = [
    ("ann", "a", 0),
    ("ann", "b", 2),
    ("ann", "c", 8),
    ("ann", "d", 9),
    ("bob", "a", 1),
    ("bob", "c", 3),
    ("bob", "a", 4),  # bob's latest pair is (bob, a), last seen on day 4
    ("cat", "b", 9),
]


def _split(
    make_config, tmp_path: Path, spark, log=LOG, on_driver: bool | None = None, **overrides
) -> tuple[set, set]:
    """(training, holdout) pairs of a weekly over ``log``; ``on_driver``: whether its pairs must have
    been aggregated on the driver (rather than by Spark)."""
    source = tmp_path / "log.csv"
    source.write_text(
        "user,item,ts\n"
        + "".join(f"{u},{i},{int((START + timedelta(days=d, hours=1)).timestamp())}\n" for u, i, d in log)
    )
    config = make_config(
        **{
            "source.path": str(source),
            "source.delimiter": ",",
            "source.header": True,
            "source.column_names": None,
            "source.mapping": {"user_id": "user", "item_id": "item", "timestamp": "ts"},
            "source.default_event_type": "view",
            **NO_MIN_SUPPORT,
            **overrides,
        }
    )
    run = RunContext.create(config, "holdout", END - timedelta(days=7), END)
    run_ingest(spark, run)
    run_interactions(spark, run)
    if on_driver is not None:
        assert run.artifacts.read_metrics()["pairs_aggregated_on_driver"] == float(on_driver)
    users, items = run.artifacts.interactions.ids("users"), run.artifacts.interactions.ids("items")

    def pairs(triples) -> set[tuple[str, str]]:
        return {(users[u], items[i]) for u, i in zip(triples.user_idx, triples.item_idx, strict=True)}

    return pairs(run.artifacts.interactions.train_triples()), pairs(
        run.artifacts.interactions.holdout_triples()
    )


def test_days_holds_out_the_windows_last_days(spark, make_config, tmp_path: Path) -> None:
    train, holdout = _split(
        make_config,
        tmp_path,
        spark,
        **{
            "interactions.holdout.strategy": "days",
            "interactions.holdout.days": 2,
            "evaluation.min_users": 1,
        },
    )
    assert holdout == {("ann", "c"), ("ann", "d"), ("cat", "b")}
    assert train == {("ann", "a"), ("ann", "b"), ("bob", "a"), ("bob", "c")}


def test_share_holds_out_the_most_recent_share_of_events(spark, make_config, tmp_path: Path) -> None:
    # 8 events: the most recent quarter is the two on day 9.
    train, holdout = _split(
        make_config,
        tmp_path,
        spark,
        **{
            "interactions.holdout.strategy": "share",
            "interactions.holdout.share": 0.25,
            "evaluation.min_users": 1,
        },
    )
    assert holdout == {("ann", "d"), ("cat", "b")}
    assert ("ann", "c") in train and len(train) == 5


# The window's events aggregated by the driver (the default at this size), or by Spark.
@pytest.mark.parametrize("driver_max_events", [25_000_000, 0], ids=["driver", "spark"])
def test_per_user_last_holds_out_each_users_latest_items(
    spark, make_config, tmp_path: Path, driver_max_events: int
) -> None:
    train, holdout = _split(
        make_config,
        tmp_path,
        spark,
        on_driver=driver_max_events > 0,
        **{
            "interactions.holdout.strategy": "per_user_last",
            "interactions.holdout.last_n": 1,
            "evaluation.min_users": 1,
            "spark.driver_max_events": driver_max_events,
        },
    )
    # bob's repeat of item a makes it his latest pair; cat has nothing left to train on, so keeps his.
    assert holdout == {("ann", "d"), ("bob", "a")}
    assert train == {("ann", "a"), ("ann", "b"), ("ann", "c"), ("bob", "c"), ("cat", "b")}


# The holdout then joins the training pairs by broadcast, or (a holdout above the bound) by a shuffle.
@pytest.mark.parametrize("broadcast_max_rows", [5_000_000, 1], ids=["broadcast", "shuffled"])
def test_a_holdout_of_a_few_users_fails_before_training_naming_the_count(
    spark, make_config, tmp_path: Path, broadcast_max_rows: int
) -> None:
    with pytest.raises(HoldoutTooSmallError) as failure:
        _split(
            make_config,
            tmp_path,
            spark,
            # bob's one held-out pair is one he trained on: evaluation cannot score him.
            log=[*LOG, ("bob", "c", 9)],
            **{
                "interactions.holdout.strategy": "days",
                "interactions.holdout.days": 2,
                "spark.broadcast_max_rows": broadcast_max_rows,
            },
        )
    message = str(failure.value)
    assert "the holdout has 2 users" in message and "evaluation.min_users=100" in message
    assert "interactions.holdout.strategy=days (interactions.holdout.days=2)" in message
