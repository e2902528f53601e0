from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from recsys_pipeline.validation import (
    DATA_DOCS,
    compare_with_popular,
    embedding_profile,
    embeddings_suite,
    events_suite,
    interactions_suite,
    recommendations_summary,
    recommendations_summary_suite,
    validate_frames,
    widened,
)

START, END = pd.Timestamp("2024-01-01", tz="UTC"), pd.Timestamp("2024-01-08", tz="UTC")


def good_events(n: int = 50) -> pd.DataFrame:
    ts = START + pd.to_timedelta(np.arange(n), unit="h")
    return pd.DataFrame(
        {
            "user_id": [f"u{i % 7}" for i in range(n)],
            "item_id": [f"i{i % 11}" for i in range(n)],
            "event_type": "view",
            "value": 1.0,
            "event_ts": ts,
            "ingested_at": END,
            "source": "test",
            "event_date": ts.date,
        }
    )


def good_interactions() -> pd.DataFrame:
    return pd.DataFrame(
        {"user_idx": [0, 0, 1, 2], "item_idx": [0, 1, 1, 2], "confidence": [1.0, 2.0, 3.0, 1.5]}
    )


def good_items(n: int = 200, dims: int = 8) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n), np.random.default_rng(0).normal(size=(n, dims)).astype(np.float32)


def run(tmp_path: Path, name: str, frame: pd.DataFrame, suite: list) -> list:
    return validate_frames(tmp_path, {name: (frame, suite)})


def test_good_frames_pass_and_data_docs_are_written(tmp_path: Path, make_config, monkeypatch) -> None:
    from great_expectations.core import config_provider

    # GX looks its settings up at every step of every suite, parsing its config variables file each
    # time there is one: after the context is made there is none, so a suite adds no parse.
    parsed: list[str] = []
    parse = config_provider.yaml.load
    monkeypatch.setattr(config_provider.yaml, "load", lambda text: parsed.append(text) or parse(text))
    config = make_config()
    assert (
        validate_frames(
            tmp_path / "one_suite", {"interactions": (good_interactions(), interactions_suite(3, 3))}
        )
        == []
    )
    parsed_for_one_suite, parsed[:] = len(parsed), []
    idx, factors = good_items()
    failures = validate_frames(
        tmp_path,
        {
            "events": (good_events(), events_suite(config, START, END)),
            "interactions": (good_interactions(), interactions_suite(3, 3)),
            "item_embeddings": (embedding_profile(idx, factors), embeddings_suite(config, 200, 200)),
        },
    )
    assert failures == []
    assert len(parsed) == parsed_for_one_suite
    site = tmp_path / DATA_DOCS
    assert (site / "index.html").is_file()
    # One validation page per suite, each run's result rendered (the site is built after the last).
    for suite in ("events", "interactions", "item_embeddings"):
        assert len(list((site / "validations" / suite).rglob("*.html"))) == 1, suite


@pytest.mark.parametrize(
    ("column", "bad_value", "expectation"),
    [
        ("user_id", None, "expect_column_values_to_not_be_null"),
        ("event_type", "teleport", "expect_column_values_to_be_in_set"),
        ("value", -2.0, "expect_column_values_to_be_between"),
        ("event_ts", END + pd.Timedelta(hours=1), "expect_column_values_to_be_between"),
    ],
)
def test_bad_events_fail_naming_suite_expectation_and_value(
    tmp_path, make_config, column, bad_value, expectation
) -> None:
    frame = good_events()
    frame[column] = frame[column].astype(object)
    frame.loc[3, column] = bad_value
    failures = run(tmp_path, "events", frame, events_suite(make_config(), START, END))
    assert [(f.suite, f.expectation, f.column) for f in failures] == [("events", expectation, column)]
    assert "events: " + expectation in str(failures[0])


@pytest.mark.parametrize(
    ("column", "bad_value", "expectation"),
    [
        ("confidence", 0.0, "expect_column_values_to_be_between"),
        ("item_idx", 3, "expect_column_values_to_be_between"),
        ("user_idx", 2, "expect_compound_columns_to_be_unique"),
    ],
)
def test_bad_interactions_fail(tmp_path, column, bad_value, expectation) -> None:
    frame = good_interactions()
    frame.loc[3, column] = bad_value
    if column == "user_idx":
        frame.loc[3, "item_idx"] = 1
        frame.loc[2, "user_idx"] = 2
    failures = run(tmp_path, "interactions", frame, interactions_suite(3, 3))
    assert [f.expectation for f in failures] == [expectation]


def test_collapsed_embeddings_fail_beyond_the_allowed_share(tmp_path, make_config) -> None:
    config = make_config()
    idx, factors = good_items()
    factors[:10] = factors[0] * np.linspace(1, 2, 10)[:, None]  # 5% of vectors point the same way
    failures = run(
        tmp_path, "item_embeddings", embedding_profile(idx, factors), embeddings_suite(config, 200, 200)
    )
    assert [(f.expectation, f.column) for f in failures] == [
        ("expect_column_values_to_be_between", "nearest_cosine")
    ]


def test_non_finite_embeddings_and_wrong_row_count_fail(tmp_path, make_config) -> None:
    config = make_config()
    idx, factors = good_items()
    factors[5, 2] = np.nan
    failures = run(
        tmp_path, "item_embeddings", embedding_profile(idx, factors), embeddings_suite(config, 200, 201)
    )
    assert {f.expectation for f in failures} >= {
        "expect_column_values_to_be_in_set",
        "expect_table_row_count_to_equal",
    }


def test_row_count_must_stay_within_the_band_of_the_previous_run(tmp_path, make_config) -> None:
    from recsys_pipeline.validation import events_volume_suite

    config = make_config(**{"validation.row_count_band": 0.2})

    def volume(rows: int) -> pd.DataFrame:
        return pd.DataFrame({"rows": [rows]})

    assert run(tmp_path / "ok", "events_volume", volume(50), events_volume_suite(config, 55)) == []
    failures = run(tmp_path / "low", "events_volume", volume(30), events_volume_suite(config, 55))
    assert [(f.expectation, f.observed) for f in failures] == [("expect_column_values_to_be_between", [30])]
    failures = run(tmp_path / "high", "events_volume", volume(80), events_volume_suite(config, 55))
    assert [f.expectation for f in failures] == ["expect_column_values_to_be_between"]
    assert run(tmp_path / "none", "events_volume", volume(0), events_volume_suite(config, None))


def test_interaction_profile_flags_one_item_dominating(tmp_path, make_config) -> None:
    from recsys_pipeline.validation import interaction_profile, interaction_profile_suite

    config = make_config()
    assert (
        run(
            tmp_path / "ok",
            "profile",
            interaction_profile(
                good_interactions().user_idx.to_numpy(), good_interactions().item_idx.to_numpy()
            ),
            interaction_profile_suite(make_config(**{"validation.max_top_item_share": 0.5})),
        )
        == []
    )
    flooded = pd.DataFrame(
        {
            "user_idx": np.arange(100),
            "item_idx": np.r_[np.zeros(90, int), np.arange(1, 11)],
            "confidence": 1.0,
        }
    )
    failures = run(
        tmp_path / "bad",
        "profile",
        interaction_profile(flooded.user_idx.to_numpy(), flooded.item_idx.to_numpy()),
        interaction_profile_suite(config),
    )
    assert [(f.column, f.observed) for f in failures] == [("top_item_share", [0.9])]


def test_recommendation_summary_flags_unserved_users_and_lists_that_repeat_the_popular_one(
    tmp_path, make_config
) -> None:
    config = make_config()
    items = np.array([f"i{n}" for n in range(200)])
    popularity = 1000 - np.arange(200)  # i0 the most popular
    seen = sp.csr_matrix(([1.0, 1.0], ([0, 0], [0, 1])), shape=(2, 200))  # user a saw i0 and i1
    users = np.array(["a", "b"])
    # Personal lists drawn among the popular items (as the best lists are on a power-law log).
    personal = pd.DataFrame(
        {
            "user_id": ["a"] * 5 + ["b"] * 5,
            "rank": [1, 2, 3, 4, 5] * 2,
            "item_id": [f"i{n}" for n in (2, 9, 12, 15, 3, 0, 8, 11, 14, 17)],
        }
    )
    personal_vs_popular = compare_with_popular(personal, users, items, popularity, seen)
    assert personal_vs_popular.share == pytest.approx(3 / 10)  # a: i2, i3 of its i2..i6; b: i0 of its i0..i4
    # 10 items against the popular lists' 7 (i0..i6).
    assert personal_vs_popular.coverage_ratio == pytest.approx(10 / 7)
    # A third user, who saw nothing, with a list of their own: 15 items against the same 7.
    spanning = pd.concat(
        [
            personal,
            pd.DataFrame(
                {"user_id": ["c"] * 5, "rank": [1, 2, 3, 4, 5], "item_id": [f"i{n}" for n in range(20, 25)]}
            ),
        ]
    )
    wide = compare_with_popular(
        spanning,
        np.array(["a", "b", "c"]),
        items,
        popularity,
        sp.vstack([seen, sp.csr_matrix((1, 200))]).tocsr(),
    )
    assert wide.share == pytest.approx(3 / 15) and wide.coverage_ratio == pytest.approx(15 / 7)
    # Lists spanning 5% of the catalogue pass: that floor is only what one sets for one's own catalogue.
    metrics = {"batch_users_served": 3.0, "batch_active_users": 3.0, "batch_coverage": 0.05}
    ok = run(
        tmp_path / "ok",
        "recs",
        recommendations_summary(spanning, metrics, wide),
        recommendations_summary_suite(config, wide),
    )
    assert ok == []
    # The popularity ranking itself, minus what each user saw.
    repeated = personal.assign(item_id=[f"i{n}" for n in (2, 3, 4, 5, 6, 0, 1, 2, 3, 4)])
    repeated_vs_popular = compare_with_popular(repeated, users, items, popularity, seen)
    assert repeated_vs_popular.share == 1.0 and repeated_vs_popular.coverage_ratio == 1.0
    # Users whose ids an erasure emptied (tombstones) keep their rows and match no list.
    tombstoned = np.array([None, "a", None, "b"], dtype=object)
    seen_with_tombstones = sp.vstack(
        [sp.csr_matrix((1, 200)), seen[0], sp.csr_matrix((1, 200)), seen[1]]
    ).tocsr()
    assert compare_with_popular(
        personal, tombstoned, items, popularity, seen_with_tombstones
    ).share == pytest.approx(3 / 10)
    failures = run(
        tmp_path / "bad",
        "recs",
        recommendations_summary(repeated, {**metrics, "batch_users_served": 0.0}, repeated_vs_popular),
        recommendations_summary_suite(config, repeated_vs_popular),
    )
    assert {f.column for f in failures} == {"active_users_served", "popular_share", "coverage_over_popular"}
    # The same few items for everyone, none of them popular: a collapse the popular share misses.
    fixed = personal.assign(item_id=[f"i{n}" for n in (90, 91, 92, 93, 94) * 2])
    fixed_vs_popular = compare_with_popular(fixed, users, items, popularity, seen)
    assert fixed_vs_popular.share == 0.0 and fixed_vs_popular.coverage_ratio == pytest.approx(5 / 7)
    failures = run(
        tmp_path / "fixed",
        "recs",
        recommendations_summary(fixed, metrics, fixed_vs_popular),
        recommendations_summary_suite(config, fixed_vs_popular),
    )
    assert [f.column for f in failures] == ["coverage_over_popular"]


def test_a_small_catalogue_its_users_mostly_saw_asks_for_half_the_room_above_the_popular_lists(
    tmp_path, make_config
) -> None:
    config = make_config()
    items = np.array([f"i{n}" for n in range(10)])
    popularity = 100 - np.arange(10)
    # Both users saw i0..i5: the popular lists of three are i6..i8, and only i9 is left beyond them.
    seen = sp.csr_matrix(np.repeat([[1.0] * 6 + [0.0] * 4], 2, axis=0))
    users = np.array(["a", "b"])
    metrics = {"batch_users_served": 2.0, "batch_active_users": 2.0, "batch_coverage": 0.4}

    def lists(a: tuple[int, ...], b: tuple[int, ...]) -> pd.DataFrame:
        return pd.DataFrame(
            {"user_id": ["a"] * 3 + ["b"] * 3, "rank": [1, 2, 3] * 2, "item_id": [f"i{n}" for n in a + b]}
        )

    def failed_columns(name: str, recs: pd.DataFrame) -> list[str | None]:
        popular = compare_with_popular(recs, users, items, popularity, seen)
        # 4 items are left unseen against the popular lists' 3: 1.5 is out of reach; half the room is.
        assert popular.attainable_ratio == pytest.approx(4 / 3)
        assert popular.coverage_floor(config.validation.min_rec_coverage_over_popular) == pytest.approx(7 / 6)
        summary = recommendations_summary(recs, metrics, popular)
        suite = recommendations_summary_suite(config, popular)
        return [f.column for f in run(tmp_path / name, "recs", summary, suite)]

    # Every item left, spread over both lists: 4 against 3, under 1.5 and as broad as can be.
    assert failed_columns("broad", lists((6, 7, 9), (6, 8, 9))) == []
    # The popular lists themselves still fail (the popular share too).
    popular_lists = lists((6, 7, 8), (6, 7, 8))
    assert failed_columns("popular", popular_lists) == ["popular_share", "coverage_over_popular"]
    # The same three items for both, one beyond the popular lists: no broader than those lists.
    assert failed_columns("narrow", lists((6, 7, 9), (6, 7, 9))) == ["coverage_over_popular"]


def test_validation_reads_a_bounded_sample_of_the_window_and_its_exact_count(weekly_run) -> None:
    from recsys_pipeline.runs import RunContext
    from recsys_pipeline.stages.validate import lake_sample, sample_positions

    small = weekly_run.config.model_copy(
        update={"validation": weekly_run.config.validation.model_copy(update={"sample_rows": 500})}
    )
    run = RunContext(
        small, weekly_run.dag_id, weekly_run.run_id, weekly_run.interval_start, weekly_run.interval_end
    )
    events, rows = lake_sample(run)
    assert len(events) == 500 and rows == weekly_run.artifacts.read_metrics()["events_ingested"]
    again, _ = lake_sample(run)
    assert events.equals(again)  # seeded: a re-run validates the same rows
    assert sample_positions(10, 50).tolist() == list(range(10))


def test_narrow_numbers_reach_gx_as_the_same_64_bit_numbers_and_other_columns_as_they_are() -> None:
    frame = pd.DataFrame(
        {
            "user_idx": np.array([0, 2_000_000_000], dtype=np.int32),
            "rank": np.array([1, 2], dtype=np.uint16),
            "confidence": np.array([0.1, 3.5], dtype=np.float32),
            "value": np.array([1.0, 2.0]),
            "user_id": ["u1", "u2"],
        }
    )
    wide = widened(frame)
    assert [str(t) for t in wide.dtypes] == ["int64", "int64", "float64", "float64", "object"]
    for name in frame.columns:
        assert wide[name].tolist() == frame[name].tolist()
