"""Publishing and consuming through the real MLflow registry (embedded SQLite store) on ML-100k."""

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from recsys_pipeline import publish
from recsys_pipeline.config import load_config
from recsys_pipeline.runs import RunContext
from recsys_pipeline.serving import Recommender, UnknownIdError
from recsys_pipeline.tables import read_id_map


def copy_run(run: RunContext, start: str, end: str) -> RunContext:
    other = RunContext.create(run.config, run.dag_id, start, end, f"manual__{end}")
    shutil.copytree(run.run_dir, other.run_dir, dirs_exist_ok=True)
    return other


def versions(run: RunContext) -> list[str]:
    client = publish.mlflow_client(run.config)
    return sorted(
        str(v.version) for v in client.search_model_versions(f"name = '{run.config.mlflow.model_name}'")
    )


def test_stages_produce_a_model_that_beats_popularity(weekly_run) -> None:
    metrics = weekly_run.read_metrics()
    assert metrics["ndcg_at_10"] > metrics["baseline_ndcg_at_10"]
    assert metrics["index_recall_at_10"] >= 0.95
    assert all(gate["passed"] for gate in weekly_run.read_gates().values())


def test_publishing_the_same_run_twice_registers_one_version(weekly_run) -> None:
    first = publish.run_publish(weekly_run)
    second = publish.run_publish(weekly_run)
    assert first == second
    assert versions(weekly_run).count(first) == 1
    publish.run_promotion(weekly_run, first)
    status = publish.champion_status(weekly_run.config)
    assert status["version"] == int(first)
    assert status["metrics"]["ndcg_at_10"] > status["metrics"]["baseline_ndcg_at_10"]
    assert status["data_window"]["end"].startswith("1998-04-23")


def test_failed_gate_leaves_the_champion_where_it_was(weekly_run) -> None:
    champion = publish.run_publish(weekly_run)
    publish.run_promotion(weekly_run, champion)
    failing = copy_run(weekly_run, "1998-04-17", "1998-04-24")
    failing.write_gate("evaluation", False, ["ndcg_at_10=0.1 does not beat baseline_ndcg_at_10=0.2"])
    candidate = publish.run_publish(failing)
    assert candidate != champion
    with pytest.raises(publish.GateFailedError, match="evaluation: ndcg_at_10=0.1"):
        publish.run_promotion(failing, candidate)
    assert publish.champion_status(weekly_run.config)["version"] == int(champion)


def test_promotion_keeps_the_replaced_champion_as_previous(weekly_run) -> None:
    champion = publish.run_publish(weekly_run)
    publish.run_promotion(weekly_run, champion)
    newer = copy_run(weekly_run, "1998-04-18", "1998-04-25")
    candidate = publish.run_publish(newer)
    publish.run_promotion(newer, candidate)
    client = publish.mlflow_client(weekly_run.config)
    name = weekly_run.config.mlflow.model_name
    assert str(client.get_model_version_by_alias(name, "champion").version) == candidate
    assert str(client.get_model_version_by_alias(name, "previous").version) == champion
    publish.promote(weekly_run.config, champion, reason="restore for later tests")


def test_recommender_excludes_history_and_rejects_unknown_ids(weekly_run) -> None:
    version = publish.run_publish(weekly_run)
    publish.run_promotion(weekly_run, version)
    recommender = Recommender.from_registry(config=weekly_run.config)
    users = read_id_map(weekly_run.stage_dir("interactions") / "maps" / "users")
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


def test_registered_pyfunc_answers_like_the_in_process_client(weekly_run) -> None:
    version = publish.run_publish(weekly_run)
    publish.run_promotion(weekly_run, version)
    publish.mlflow_client(weekly_run.config)
    model = mlflow.pyfunc.load_model(f"models:/{weekly_run.config.mlflow.model_name}@champion")
    recommender = Recommender.from_registry(config=weekly_run.config)
    users = read_id_map(weekly_run.stage_dir("interactions") / "maps" / "users")[:3]
    predicted = model.predict(pd.DataFrame({"user_id": users, "k": [5, 5, 5]}))
    expected = pd.concat([recommender.recommend(u, 5) for u in users], ignore_index=True)
    pd.testing.assert_frame_equal(predicted[expected.columns].reset_index(drop=True), expected)
    similar = model.predict(pd.DataFrame({"item_id": [expected["item_id"].iloc[0]], "k": [4]}))
    assert similar["rank"].tolist() == [1, 2, 3, 4]
    assert np.all(np.diff(similar["score"].to_numpy()) <= 0)


def test_status_without_a_champion_is_a_clear_error(tmp_path: Path) -> None:
    config = load_config(overrides={"state_dir": str(tmp_path)})
    with pytest.raises(publish.NothingPublishedError, match="no version"):
        publish.champion_status(config)


def test_cli_versions_promote_and_rollback(weekly_run, capsys) -> None:
    from recsys_pipeline.cli import main

    state = ["--set", f"state_dir={weekly_run.config.state_home}"]
    first = publish.run_publish(weekly_run)
    publish.run_promotion(weekly_run, first)
    newer = copy_run(weekly_run, "1998-04-19", "1998-04-26")
    second = publish.run_publish(newer)
    assert main([*state, "promote", "--version", second, "--reason", "ab test won"]) == 0
    capsys.readouterr()
    assert main([*state, "versions", "--json"]) == 0
    rows = {str(row["version"]): row for row in json.loads(capsys.readouterr().out)}
    assert rows[second]["aliases"] == ["champion"] and rows[first]["aliases"] == ["previous"]
    assert rows[second]["tags"]["promotion_reason"] == "ab test won"
    assert "ndcg_at_10" in rows[second]["metrics"]
    assert main([*state, "rollback", "--reason", "bad canary"]) == 0
    assert publish.champion_status(weekly_run.config)["version"] == int(first)
    assert publish.champion_status(weekly_run.config)["tags"]["promotion_reason"] == "rollback: bad canary"


def test_client_refuses_a_bundle_of_an_unsupported_format(weekly_run, tmp_path: Path) -> None:
    from recsys_pipeline.serving import BundleFormatError

    bundle = tmp_path / "bundle"
    shutil.copytree(publish.build_bundle(weekly_run), bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    assert Recommender(bundle).meta["format_version"] == meta["format_version"]
    (bundle / "bundle.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(BundleFormatError, match="bundle format 99 is not supported"):
        Recommender(bundle)


def test_cli_reports_registry_errors_without_a_traceback(weekly_run, capsys) -> None:
    from recsys_pipeline.cli import main

    publish.run_publish(weekly_run)
    capsys.readouterr()
    assert main(["--set", f"state_dir={weekly_run.config.state_home}", "promote", "--version", "999"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("recsys: ") and "version=999" in error and "Traceback" not in error


def test_a_run_failing_validation_is_logged_to_mlflow_but_not_registered(weekly_run) -> None:
    from recsys_pipeline.validation import ValidationFailedError, run_validation

    strict = weekly_run.config.model_copy(
        update={"validation": weekly_run.config.validation.model_copy(update={"max_top_item_share": 1e-6})}
    )
    failing = RunContext(
        strict, weekly_run.dag_id, "manual__strict", weekly_run.interval_start, weekly_run.interval_end
    )
    before = versions(weekly_run)
    try:
        with pytest.raises(ValidationFailedError, match="interaction_profile: .* top_item_share"):
            run_validation(failing)
        client = publish.mlflow_client(strict)
        experiment = client.get_experiment_by_name(strict.mlflow.experiment)
        (rejected,) = client.search_runs([experiment.experiment_id], "tags.airflow_run_id = 'manual__strict'")
        assert "top_item_share" in rejected.data.tags["rejected"]
        assert "ndcg_at_10" in rejected.data.metrics
        logged = {a.path for a in client.list_artifacts(rejected.info.run_id, "validation")}
        assert "validation/failures.json" in logged and "validation/gx" in logged
        assert versions(weekly_run) == before
    finally:
        run_validation(weekly_run)  # later tests publish this run: leave its validation passing
