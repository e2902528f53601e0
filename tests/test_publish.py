"""Publishing and consuming through the real MLflow registry (embedded SQLite store) on ML-100k.

Every test that publishes works on its own copy of the weekly run's state (``own_weekly_run``).
"""

import io
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from recsys_pipeline import registry, tracking
from recsys_pipeline.artifacts import Gate
from recsys_pipeline.bundle import Bundle, BundleFormatError, write_bundle
from recsys_pipeline.config import load_config
from recsys_pipeline.errors import RecsysError, StageSkipped
from recsys_pipeline.registry import Registry
from recsys_pipeline.runs import RunContext
from recsys_pipeline.serving import Recommender, UnknownIdError
from recsys_pipeline.stages.publish import run_promotion, run_publish, run_tags
from tests.conftest import another_run_of, copy_run


def versions(run: RunContext) -> list[str]:
    client = tracking.client(run.config)
    return sorted(
        str(v.version) for v in client.search_model_versions(f"name = '{run.config.mlflow.model_name}'")
    )


def test_stages_produce_a_model_that_beats_popularity(weekly_run) -> None:
    metrics = weekly_run.artifacts.read_metrics()
    assert metrics["ndcg_at_10"] > metrics["baseline_ndcg_at_10"]
    for name in ("ndcg_at_10", "baseline_ndcg_at_10", "map_at_10"):
        assert metrics[f"{name}_ci_low"] < metrics[name] < metrics[f"{name}_ci_high"]
    assert metrics["index_recall_at_10"] >= 0.95
    assert all(gate["passed"] for gate in weekly_run.artifacts.read_gates().values())


def test_publishing_the_same_run_twice_registers_one_version(own_weekly_run) -> None:
    first = run_publish(own_weekly_run)
    second = run_publish(own_weekly_run)
    assert first == second
    assert versions(own_weekly_run).count(first) == 1
    run_promotion(own_weekly_run, first)
    status = Registry(own_weekly_run.config).champion_status()
    assert status["version"] == int(first)
    assert status["metrics"]["ndcg_at_10"] > status["metrics"]["baseline_ndcg_at_10"]
    assert status["data_window"]["end"].startswith("1998-04-23")
    # The served vectors (cold items flagged) and the content map travel in the verified bundle.
    bundle = Registry(own_weekly_run.config).version_bundle(first)
    assert {"content_vectors.parquet", "content_map.parquet", "content_map.json"} <= {
        path.name for path in (bundle.path / "content").iterdir()
    }
    served = bundle.embeddings()
    assert len(served.cold_item_idx) == status["content"]["cold_items"] > 0
    assert np.isin(served.cold_item_idx, served.item_idx).all()


def test_the_copy_publish_checked_is_the_local_copy_the_next_load_only_verifies(
    own_weekly_run, monkeypatch
) -> None:
    """Loading a version just published downloads nothing; a local copy changed since fails its check
    and is downloaded afresh."""
    version = run_publish(own_weekly_run)
    downloads: list[str] = []
    download = Registry._download

    def counted(self: Registry, version: str, run_id: str, staging: Path) -> None:
        downloads.append(version)
        download(self, version, run_id, staging)

    monkeypatch.setattr(Registry, "_download", counted)
    registry_ = Registry(own_weekly_run.config)
    metrics = registry_.version_bundle(version).path / "metrics.json"
    assert downloads == [] and json.loads(metrics.read_text())["ndcg_at_10"] > 0
    metrics.write_text("{}")
    assert json.loads((registry_.version_bundle(version).path / "metrics.json").read_text())["ndcg_at_10"] > 0
    assert downloads == [version]


def test_a_dry_run_registers_its_version_but_skips_promotion(own_weekly_run) -> None:
    config = own_weekly_run.config
    unpromoted = config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"promote": False})})
    dry = another_run_of(own_weekly_run, "manual__dry", unpromoted)
    version = run_publish(dry)
    assert dry.publication.published_version() == version
    with pytest.raises(StageSkipped, match=f"dry run: version {version} passed every gate"):
        run_promotion(dry, version)
    assert Registry(config).alias_version(registry.CHAMPION) is None
    tags = tracking.client(config).get_model_version(config.mlflow.model_name, version).tags
    assert tags["would_promote"] == "true"
    # A later dry run (a dry replay's next week) is judged against it, as if it had been promoted; a
    # live run is not: it never builds on a version that did not go live.
    later = copy_run(own_weekly_run, "1998-04-23", "1998-04-30")
    assert str(Registry(unpromoted).reference_version(later.interval_end).version) == version
    assert Registry(later.config).reference_version(later.interval_end) is None
    # Published, its folder is frozen: a stage re-run there is refused, a new run is not.
    with pytest.raises(RecsysError, match="trigger a new run for this window"):
        dry.publication.refuse_if_published("train")
    own_weekly_run.publication.refuse_if_published("train")


def test_a_replayed_older_week_is_judged_against_the_champion_of_its_time(own_weekly_run) -> None:
    from recsys_pipeline.stages.evaluate import run_evaluation
    from recsys_pipeline.stages.validate import champion_rows

    champion = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, champion)
    # A week before the champion's data ends: the champion has trained on its holdout, and no
    # version was champion back then, so nothing is compared; the champion stays where it is.
    older = copy_run(own_weekly_run, "1998-04-09", "1998-04-16")
    assert Registry(older.config).reference_version(older.interval_end) is None
    assert champion_rows(older, Registry(older.config)) is None  # nor a row-count band
    assert not any(name.startswith("champion_") for name in run_evaluation(older))
    replayed = run_publish(older)
    with pytest.raises(StageSkipped, match="recorded as would_promote, champion left as it was"):
        run_promotion(older, replayed)
    client = tracking.client(older.config)
    assert client.get_model_version(older.config.mlflow.model_name, replayed).tags["would_promote"] == "true"
    assert Registry(older.config).champion_status()["version"] == int(champion)
    # A later week is judged against the live champion, and a week that ends later than a version
    # once promoted, but earlier than the champion, against that version.
    later = copy_run(own_weekly_run, "1998-04-23", "1998-04-30")
    assert str(Registry(later.config).reference_version(later.interval_end).version) == champion
    assert (
        champion_rows(later, Registry(later.config))
        == own_weekly_run.artifacts.read_metrics()["window_events"]
        > 0
    )
    assert "champion_ndcg_at_10" in run_evaluation(later)
    Registry(later.config).promote(str(run_publish(later)), reason="test: a newer champion")
    between = Registry(later.config).reference_version(own_weekly_run.interval_end)
    assert str(between.version) == champion


def test_failed_gate_leaves_the_champion_where_it_was(own_weekly_run) -> None:
    champion = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, champion)
    failing = copy_run(own_weekly_run, "1998-04-17", "1998-04-24")
    failing.artifacts.write_gate(
        Gate.EVALUATION, False, ["ndcg_at_10=0.1 does not beat baseline_ndcg_at_10=0.2"]
    )
    candidate = run_publish(failing)
    assert candidate != champion
    with pytest.raises(registry.GateFailedError, match="evaluation: ndcg_at_10=0.1"):
        run_promotion(failing, candidate)
    assert Registry(own_weekly_run.config).champion_status()["version"] == int(champion)


def test_promotion_keeps_the_replaced_champion_as_previous(own_weekly_run) -> None:
    champion = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, champion)
    newer = copy_run(own_weekly_run, "1998-04-18", "1998-04-25")
    candidate = run_publish(newer)
    run_promotion(newer, candidate)
    client = tracking.client(own_weekly_run.config)
    name = own_weekly_run.config.mlflow.model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == candidate
    assert str(client.get_model_version_by_alias(name, "previous").version) == champion
    Registry(own_weekly_run.config).promote(champion, reason="restore for later tests")


def test_recommender_excludes_history_and_rejects_unknown_ids(own_weekly_run) -> None:
    version = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, version)
    recommender = Recommender.from_registry(config=own_weekly_run.config)
    users = own_weekly_run.artifacts.interactions.ids("users")
    user_id = users[0]
    recs = recommender.recommend(user_id, k=10)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
    assert recs["rank"].tolist() == list(range(1, 11))
    assert recs["score"].is_monotonic_decreasing
    seen = set(recommender.item_ids[recommender.history[0].indices])
    assert not seen & set(recs["item_id"])
    similar = recommender.similar(recs["item_id"].iloc[0], k=5)
    assert len(similar) == 5 and recs["item_id"].iloc[0] not in set(similar["item_id"])
    with pytest.raises(UnknownIdError, match="unknown user id"):
        recommender.recommend("no-such-user")
    with pytest.raises(UnknownIdError, match="unknown item id"):
        recommender.similar("no-such-item")
    popular = recommender.recommend("no-such-user", k=3, unknown="popular")
    assert popular["item_id"].tolist() == list(recommender.item_ids[recommender.popular[:3]])


@pytest.mark.e2e
def test_registered_pyfunc_answers_like_the_in_process_client(own_weekly_run, tmp_path: Path) -> None:
    version = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, version)
    with tracking.fluent(own_weekly_run.config):
        model = mlflow.pyfunc.load_model(f"models:/{own_weekly_run.config.mlflow.model_name}@champion")
    recommender = Recommender.from_registry(config=own_weekly_run.config)
    users = own_weekly_run.artifacts.interactions.ids("users")[:3]
    predicted = model.predict(pd.DataFrame({"user_id": users, "k": [5, 5, 5]}))
    expected = pd.concat([recommender.recommend(u, 5) for u in users], ignore_index=True)
    pd.testing.assert_frame_equal(predicted[expected.columns].reset_index(drop=True), expected)
    similar = model.predict(pd.DataFrame({"item_id": [expected["item_id"].iloc[0]], "k": [4]}))
    assert similar["rank"].tolist() == [1, 2, 3, 4]
    assert np.all(np.diff(similar["score"].to_numpy()) <= 0)

    # The model carries its own code: a fresh virtual environment holding the third-party packages
    # but not recsys-pipeline loads the stored files and answers the same.
    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    (fresh / "lib" / "python3.11" / "site-packages" / "third_party.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"  # its .pth files (the editable install) are not read
    )
    script = (
        "import sys, mlflow, pandas as pd\n"
        "try:\n    import recsys_pipeline\nexcept ImportError:\n    pass\n"
        "else:\n    sys.exit('recsys_pipeline is installed here')\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "frame = pd.DataFrame({'user_id': sys.argv[2:], 'k': 5})\n"
        "print(model.predict(frame).to_json(orient='records'))\n"
    )
    stored = Registry(own_weekly_run.config).verified_model(version)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    loaded = subprocess.run(
        [str(fresh / "bin" / "python"), "-c", script, str(stored), *users],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    answer = io.StringIO(loaded.stdout.strip().splitlines()[-1])
    answered = pd.read_json(answer, dtype={"user_id": str, "item_id": str})
    pd.testing.assert_frame_equal(
        answered[expected.columns].reset_index(drop=True), expected, check_dtype=False, atol=1e-5
    )


def test_status_without_a_champion_is_a_clear_error(tmp_path: Path) -> None:
    config = load_config(overrides={"state_dir": str(tmp_path)})
    with pytest.raises(registry.NothingPublishedError, match="no version .* nothing has been published yet"):
        Registry(config).champion_status()


def test_status_says_why_nothing_is_champion(own_weekly_run) -> None:
    own_weekly_run.artifacts.write_gate(
        Gate.EVALUATION, False, ["ndcg_at_10=0.1 does not beat baseline_ndcg_at_10=0.2"]
    )
    version = run_publish(own_weekly_run)
    with pytest.raises(registry.GateFailedError):
        run_promotion(own_weekly_run, version)
    with pytest.raises(
        registry.NothingPublishedError,
        match=f"version {version} failed the evaluation gate: ndcg_at_10=0.1 does not beat",
    ):
        Registry(own_weekly_run.config).champion_status()


def test_status_names_the_run_that_failed_before_publishing_and_why(tmp_path: Path) -> None:
    config = load_config(overrides={"state_dir": str(tmp_path)})
    end = datetime(1998, 4, 23, tzinfo=UTC)
    run = RunContext.create(config, "recsys_weekly", end - timedelta(days=7), end)
    run.publication.record_failure(
        "build_interactions", RecsysError("the holdout has 12 users with an item ...")
    )
    with pytest.raises(
        registry.NothingPublishedError,
        match=f"run {run.run_key} failed at build_interactions: the holdout has 12 users with an item",
    ):
        Registry(config).champion_status()


def test_cli_versions_promote_and_rollback(own_weekly_run, capsys) -> None:
    from recsys_pipeline.cli import main

    state = ["--set", f"state_dir={own_weekly_run.config.state_home}"]
    first = run_publish(own_weekly_run)
    run_promotion(own_weekly_run, first)
    newer = copy_run(own_weekly_run, "1998-04-19", "1998-04-26")
    second = run_publish(newer)
    assert main([*state, "promote", "--version", second, "--reason", "ab test won"]) == 0
    capsys.readouterr()
    assert main([*state, "versions", "--json"]) == 0
    rows = {str(row["version"]): row for row in json.loads(capsys.readouterr().out)}
    assert rows[second]["aliases"] == ["champion"] and rows[first]["aliases"] == ["previous"]
    assert rows[second]["tags"]["promotion_reason"] == "ab test won"
    assert "ndcg_at_10" in rows[second]["metrics"]
    assert main([*state, "rollback", "--reason", "bad canary"]) == 0
    assert Registry(own_weekly_run.config).champion_status()["version"] == int(first)
    assert (
        Registry(own_weekly_run.config).champion_status()["tags"]["promotion_reason"]
        == "rollback: bad canary"
    )


def test_client_refuses_a_bundle_of_an_unsupported_format(own_weekly_run, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(write_bundle(own_weekly_run, {"tags": run_tags(own_weekly_run)}), bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert Recommender.from_path(bundle).meta["format_version"] == meta["format_version"]
    (bundle / "bundle.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(BundleFormatError, match="bundle format 99 is not supported"):
        Recommender.from_path(bundle)
    with pytest.raises(BundleFormatError, match="not a bundle"):
        Bundle(tmp_path)


def test_cli_reports_registry_errors_without_a_traceback(own_weekly_run, capsys) -> None:
    from recsys_pipeline.cli import main

    run_publish(own_weekly_run)
    capsys.readouterr()
    assert (
        main(["--set", f"state_dir={own_weekly_run.config.state_home}", "promote", "--version", "999"]) == 1
    )
    error = capsys.readouterr().err
    assert error.startswith("recsys: ") and "version=999" in error and "Traceback" not in error


def test_a_run_failing_validation_is_logged_to_mlflow_but_not_registered(own_weekly_run) -> None:
    from recsys_pipeline.stages.validate import run_validation
    from recsys_pipeline.validation import ValidationFailedError

    strict = own_weekly_run.config.model_copy(
        update={
            "validation": own_weekly_run.config.validation.model_copy(update={"max_top_item_share": 1e-6})
        }
    )
    failing = another_run_of(own_weekly_run, "manual__strict", strict)
    before = versions(own_weekly_run)
    with pytest.raises(ValidationFailedError, match="interaction_profile: .* top_item_share"):
        run_validation(failing)
    client = tracking.client(strict)
    experiment = client.get_experiment_by_name(strict.mlflow.experiment)
    (rejected,) = client.search_runs([experiment.experiment_id], "tags.airflow_run_id = 'manual__strict'")
    assert "top_item_share" in rejected.data.tags["rejected"]
    assert "ndcg_at_10" in rejected.data.metrics
    logged = {a.path for a in client.list_artifacts(rejected.info.run_id, "validation")}
    assert "validation/failures.json" in logged and "validation/gx" in logged
    assert versions(own_weekly_run) == before
    with pytest.raises(registry.NothingPublishedError, match="failed validation: interaction_profile"):
        Registry(strict).champion_status()
