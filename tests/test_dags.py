"""DAG integrity, plus end-to-end runs of the weekly DAG through the real Airflow CLI."""

import hashlib
import json
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest

from recsys_pipeline.cli import airflow_environment
from recsys_pipeline.config import PROJECT_ROOT, SAMPLE_PROFILE_PATH, load_config
from recsys_pipeline.pipelines import NIGHTLY, WEEKLY

RECSYS = str(Path(sys.executable).parent / "recsys")
WEEKLY_TASKS = [
    "ingest_and_build_interactions",
    "train",
    "content",
    "evaluate",
    "build_index",
    "batch_recommend",
    "validate",
    "publish",
    "promote",
]


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(PROJECT_ROOT / "dags"))


NIGHTLY_TASKS = [
    "ingest_and_build_interactions",
    "fold_in",
    "escalate_or_continue",
    "update_index",
    "batch_recommend",
    "validate",
    "publish",
    "promote",
]


def test_dags_import_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert {"recsys_weekly", "recsys_nightly", "recsys_forget"} <= set(dagbag.dags)


@pytest.mark.e2e
def test_parsing_the_dag_files_loads_no_spark_and_no_array_library(tmp_path: Path) -> None:
    """Airflow parses DAG files over and over; what the tasks need loads when they run."""
    heavy = ("pyspark", "numpy", "scipy", "pyarrow", "pandas", "mlflow", "great_expectations")
    script = (
        "import runpy, sys\n"
        f"for path in {[str(path) for path in sorted((PROJECT_ROOT / 'dags').glob('*.py'))]!r}:\n"
        "    runpy.run_path(path)\n"
        f"print(sorted(name for name in {heavy!r} if name in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script],
        env={"PATH": "", "RECSYS_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert loaded.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("dag_id", ["recsys_weekly", "recsys_nightly", "recsys_forget"])
def test_dag_integrity_docs_tags_owner_retries_and_timeouts(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.doc_md and dag_id in dag.doc_md
    assert "recsys" in dag.tags
    assert dag.max_active_runs == 1 and not dag.catchup
    for task in dag.tasks:
        assert task.owner == "recsys", task.task_id
        assert task.retries >= 2 and task.retry_exponential_backoff, task.task_id
        assert task.execution_timeout is not None, task.task_id
    spark_tasks = [task for task in dag.tasks if task.task_type == "StageSparkSubmitOperator"]
    assert all(task.pool == "recsys_spark" for task in spark_tasks)
    assert bool(spark_tasks) == (dag_id != "recsys_forget")  # erasure rewrites files without Spark
    others = [task for task in dag.tasks if task not in spark_tasks]
    assert all(task.pool == "default_pool" for task in others)


def test_the_forget_dag_takes_only_a_request_id_and_runs_its_stages_in_order(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    dag = dagbag.dags["recsys_forget"]
    assert type(dag.timetable).__name__ == "NullTimetable"  # only ever triggered, by `recsys forget`
    assert set(dag.params.keys()) == {"request_id"}
    with pytest.raises(ParamValidationError):
        dag.params.get_param("request_id").resolve(value="")
    assert [task.task_id for task in dag.topological_sort()] == ["erase_state", "republish", "verify_erasure"]
    outlets = {task.task_id: [asset.name for asset in task.outlets] for task in dag.tasks}
    assert outlets == {"erase_state": [], "republish": ["recsys-als_champion"], "verify_erasure": []}


@pytest.mark.parametrize("dag_id", ["recsys_weekly", "recsys_nightly"])
def test_the_trigger_form_has_typed_params_that_default_to_the_config(dagbag, dag_id: str) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    params = dagbag.dags[dag_id].params
    config = load_config()
    assert params.get_param("als_factors").resolve() == config.als.factors
    assert params.get_param("als_backend").resolve(value="spark") == "spark"
    for name, wrong in (
        ("als_backend", "torch"),
        ("als_factors", 0),
        ("holdout_strategy", "random"),
        ("dry_run", "yes"),
    ):
        with pytest.raises(ParamValidationError):
            params.get_param(name).resolve(value=wrong)


def test_trigger_params_become_overrides_and_config_overrides_win() -> None:
    from recsys_pipeline.config import DEFAULT_SWEEP_SPACE
    from recsys_pipeline.trigger import run_overrides, trigger_defaults

    config = load_config()
    assert run_overrides({**trigger_defaults(config), "config_overrides": {}}, config) == {}
    asked = {
        **trigger_defaults(config),
        "als_factors": 16,
        "sweep": False,
        "full_reingest": True,
        "dry_run": True,
        "config_overrides": {"als.factors": 24, "drift.k": 5},
    }
    overrides = run_overrides(asked, config)
    assert overrides["als.factors"] == 24 and overrides["drift.k"] == 5
    assert overrides["events.incremental"] is False and overrides["mlflow.promote"] is False
    assert load_config(overrides=overrides).als.sweep is None  # the default sweep turned off
    unswept = load_config(overrides={"als.sweep": None})
    swept = load_config(overrides=run_overrides({**trigger_defaults(unswept), "sweep": True}, unswept))
    assert swept.als.sweep is not None and swept.als.sweep.space == DEFAULT_SWEEP_SPACE


@pytest.mark.parametrize("dag_id", ["recsys_weekly", "recsys_nightly"])
def test_every_task_alerts_on_failure_and_promote_updates_the_champion_asset(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    for task in dag.tasks:
        assert any(
            type(callback).__name__ == "RecsysFailureNotifier" for callback in task.on_failure_callback
        )
    (asset,) = dag.get_task("promote").outlets
    assert asset.uri == "recsys://recsys-als/champion"
    assert all(not task.outlets for task in dag.tasks if task.task_id != "promote")


def test_the_failure_alert_posts_to_the_alerts_connection(monkeypatch) -> None:
    import http.server
    import threading

    from recsys_pipeline.orchestration import failure_notifier

    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("AIRFLOW_CONN_RECSYS_ALERTS", f"http://127.0.0.1:{server.server_port}/hook")

    class TaskInstance:
        task_id, dag_id = "train", "recsys_weekly"

    failure_notifier().notify(
        {"task_instance": TaskInstance(), "run_id": "manual__x", "exception": ValueError("boom")}
    )
    server.shutdown()
    assert received == [{"text": "recsys: task train of recsys_weekly run manual__x failed: boom"}]


def test_a_user_facing_failure_fails_the_task_without_retries(tmp_path: Path, monkeypatch) -> None:
    """A RecsysError (bad input, a gate) would fail the same way again, so the task fails for good."""
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowFailException

    from recsys_pipeline.orchestration import call_stage

    context = {
        "dag": SimpleNamespace(dag_id="recsys_nightly"),
        "task": SimpleNamespace(task_id="escalate_or_continue"),
        "run_id": "manual__probe",
        "data_interval_start": "1998-04-22T00:00:00+00:00",
        "data_interval_end": "1998-04-23T00:00:00+00:00",
        "params": {},
    }
    monkeypatch.setenv("RECSYS_HOME", str(tmp_path))
    with pytest.raises(AirflowFailException, match="no refresh record .* run the fold-in first"):
        call_stage(NIGHTLY.stage("escalate_or_continue"), "refresh", context)
    # Even a failed task records what it cost.
    (cost,) = (tmp_path / "runs" / "recsys_nightly").glob("*/*/metrics/stage_escalate_or_continue.json")
    recorded = json.loads(cost.read_text())
    assert recorded["stage_seconds_escalate_or_continue"] >= 0
    assert recorded["stage_peak_rss_mb_escalate_or_continue"] > 0


@pytest.mark.parametrize("pipeline", [WEEKLY, NIGHTLY], ids=lambda p: p.dag_id)
def test_each_dag_is_its_declared_pipeline(dagbag, pipeline) -> None:
    """Every stage a task (a Spark job's stages share one), after exactly the stages it reads from."""
    from recsys_pipeline.orchestration import task_id

    dag = dagbag.dags[pipeline.dag_id]
    config = load_config()
    tasks = {task_id(pipeline, stage, config) for stage in pipeline.stages}
    assert set(dag.task_ids) - {"trigger_full_retrain"} == tasks
    for stage in pipeline.stages:
        own = task_id(pipeline, stage, config)
        expected = {
            task_id(pipeline, pipeline.stage(name), config) for name in pipeline.upstream(stage.name)
        } - {own}
        assert dag.get_task(own).upstream_task_ids == expected, own


def test_the_weekly_trains_in_its_task_unless_spark_trains(dagbag) -> None:
    dag = dagbag.dags["recsys_weekly"]
    assert set(dag.task_ids) == set(WEEKLY_TASKS)
    assert dag.get_task("train").task_type == "_PythonDecoratedOperator"  # implicit: no JVM
    # The item metadata is taken in inside the events' Spark application, between its two stages.
    ingest = dag.get_task("ingest_and_build_interactions")
    assert ingest.task_type == "StageSparkSubmitOperator"
    assert ingest._conn_id == load_config().spark.conn_id
    assert [stage.name for stage in WEEKLY.spark_jobs(load_config())["ingest_and_build_interactions"]] == [
        "ingest_events",
        "ingest_items",
        "build_interactions",
    ]
    assert {"recsys", "weekly"} <= set(dag.tags)
    assert dag.timetable.delta == timedelta(weeks=1)
    from recsys_pipeline.orchestration import task_id

    spark = load_config(overrides={"als.backend": "spark"})
    assert task_id(WEEKLY, WEEKLY.stage("train"), spark) == "train" and WEEKLY.spark_jobs(spark)["train"]
    assert "train" not in WEEKLY.spark_jobs(load_config())


def test_nightly_dag_folds_in_daily_and_can_hand_over_to_a_full_retrain(dagbag) -> None:
    dag = dagbag.dags["recsys_nightly"]
    assert set(dag.task_ids) == {*NIGHTLY_TASKS, "trigger_full_retrain"}
    branch = dag.get_task("escalate_or_continue")
    assert branch.downstream_task_ids == {"trigger_full_retrain", "update_index", "batch_recommend"}
    trigger = dag.get_task("trigger_full_retrain")
    assert trigger.trigger_dag_id == "recsys_weekly"
    # The weekly run it starts gets this run's params back as a dict, quotes and braces intact, and
    # the weekly's trigger form takes them as they are (a dry run stays a dry run).
    params = {
        "dry_run": True,
        "config_overrides": {"als.backend": 'spark {"x"}', "drift.min_rec_overlap": 1.0},
    }
    rendered = trigger.render_template(trigger.conf, {"params": params})
    assert json.loads(rendered) == params
    weekly = dagbag.dags["recsys_weekly"].params
    assert weekly.get_param("config_overrides").resolve(value=params["config_overrides"])
    assert weekly.get_param("dry_run").resolve(value=True) is True
    assert dag.timetable.delta == timedelta(days=1)
    submitted = dag.get_task("ingest_and_build_interactions").application_args
    assert submitted[submitted.index("--job") + 1] == "ingest_and_build_interactions"
    # The night's Spark job takes spark.refresh_conf over spark.conf; the weekly's only spark.conf.
    options = "spark.driver.extraJavaOptions"
    spark = load_config().spark
    nightly = dag.get_task("ingest_and_build_interactions").conf[options]
    weekly = dagbag.dags["recsys_weekly"].get_task("ingest_and_build_interactions").conf[options]
    assert nightly == spark.refresh_conf[options] != weekly == spark.conf[options]
    assert spark.model_copy(update={"refresh_conf": {"a": "2"}, "conf": {"a": "1", "b": "1"}}).job_conf(
        True
    ) == {"a": "2", "b": "1"}


def movie_genres() -> dict[str, set[int]]:
    """The bundled sample's genres per item id, from u.item's 19 flags."""
    rows = (PROJECT_ROOT / "data" / "ml-100k" / "u.item").read_text(encoding="latin1").splitlines()
    return {
        fields[0]: {n for n, flag in enumerate(fields[5:]) if flag == "1"}
        for fields in (row.split("|") for row in rows)
    }


def recsys(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([RECSYS, *args], env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(
            f"recsys {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def airflow_json(*args: str, env: dict[str, str]) -> list[dict]:
    """The JSON table an airflow CLI command prints after any warnings it logs to stdout."""
    stdout = recsys("airflow", *args, "-o", "json", env=env).stdout
    return json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("[")))


def task_states(env: dict[str, str], dag_id: str = "recsys_weekly") -> dict[str, str]:
    runs = airflow_json("dags", "list-runs", dag_id, env=env)
    latest = max(runs, key=lambda r: r["run_after"])  # dags test dates a run by its logical date
    states = airflow_json("tasks", "states-for-dag-run", dag_id, latest["run_id"], env=env)
    return {row["task_id"]: row["state"] for row in states}


@pytest.fixture(scope="module")
def state_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("recsys_home")
    env = airflow_environment(load_config(overrides={"state_dir": str(home)}), None) | {
        "RECSYS_HOME": str(home)
    }
    env["AIRFLOW_HOME"] = str(home / "airflow")
    env["AIRFLOW_CONN_RECSYS_SPARK"] = json.dumps({"conn_type": "spark", "host": "local[2]"})
    recsys("airflow", "db", "migrate", env=env)
    pools = {row["pool"]: row for row in airflow_json("pools", "list", env=env)}
    assert pools["recsys_spark"]["slots"] in (1, "1")  # made by the wrapper's migrate, for the Spark tasks
    return env


@pytest.fixture(scope="module")
def weekly_dag_run(state_env) -> dict[str, str]:
    """The weekly DAG run for the sample's last week, once per module: the champion every other
    e2e test here starts from, whichever of them runs first or alone."""
    recsys("airflow", "dags", "test", "recsys_weekly", "1998-04-23", env=state_env)
    return state_env


@pytest.mark.e2e
def test_weekly_dag_runs_end_to_end_and_publishes_a_champion(weekly_dag_run) -> None:
    state_env = weekly_dag_run
    assert task_states(state_env) == dict.fromkeys(WEEKLY_TASKS, "success")
    status = json.loads(recsys("status", "--json", env=state_env).stdout)
    assert status["model"] == "recsys-als" and status["version"] == 1
    assert {"run_id", "data_window", "created_at"} <= set(status)
    metrics = status["metrics"]
    for name in (
        "precision_at_10",
        "recall_at_10",
        "ndcg_at_10",
        "map_at_10",
        "coverage_at_10",
        "baseline_ndcg_at_10",
        "index_recall_at_10",
    ):
        assert name in metrics
    assert metrics["ndcg_at_10"] > metrics["baseline_ndcg_at_10"]
    # Every stage before publishing recorded its wall time and peak memory (the JVM's included for
    # Spark), those sharing a Spark task too.
    stages = [stage.name for stage in WEEKLY.stages]
    for stage in stages[: stages.index("publish")]:
        assert status["stages"][stage]["seconds"] > 0 and status["stages"][stage]["peak_rss_mb"] > 0, stage
    assert status["stages"]["ingest_events"]["peak_rss_mb"] > 250  # a Python driver alone stays near 100 MB
    recs = json.loads(recsys("recommend", "--user-id", "1", "-k", "5", "--json", env=state_env).stdout)
    assert [r["rank"] for r in recs] == [1, 2, 3, 4, 5] and all(r["user_id"] == "1" for r in recs)
    similar = json.loads(recsys("similar", "--item-id", "50", "-k", "3", "--json", env=state_env).stdout)
    assert len(similar) == 3
    # Nemesis 2 (action, sci-fi, thriller) has one rating: too few to learn from, placed by its content.
    assert status["content"]["cold_items"] > 0 and status["content"]["map"]["r2"] > 0
    cold = json.loads(recsys("similar", "--item-id", "1596", "-k", "10", "--json", env=state_env).stdout)
    genres = movie_genres()
    assert sum(bool(genres[row["item_id"]] & genres["1596"]) for row in cold) >= 7
    unknown = recsys("recommend", "--user-id", "nobody", env=state_env, check=False)
    assert (
        unknown.returncode == 1 and "unknown user id" in unknown.stderr and "Traceback" not in unknown.stderr
    )


def window_dir(env: dict[str, str]) -> Path:
    return Path(env["RECSYS_HOME"]) / "runs" / "recsys_weekly" / "1998-04-16T0000_1998-04-23T0000"


def tree_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.e2e
@pytest.mark.slow  # a whole-DAG run: with the weekly and nightly runs, it set `make test`'s length
def test_corrupted_input_fails_the_run_keeping_the_champion_and_its_files(
    weekly_dag_run, tmp_path: Path
) -> None:
    state_env = weekly_dag_run
    # A second run of the champion's window with another config (a source whose every tenth line is
    # garbage): it gets a folder of its own, fails at ingest, and neither the champion nor the
    # published run's files change (before runs were scoped, its snapshot and metrics overwrote them).
    before = json.loads(recsys("status", "--json", env=state_env).stdout)
    pointer = json.loads((window_dir(state_env) / "published.json").read_text())
    published = window_dir(state_env) / pointer["run_dir"]
    published_files = tree_hashes(published)
    lines = (PROJECT_ROOT / "data" / "ml-100k" / "u.data").read_text().splitlines()
    corrupted = tmp_path / "u.data"
    corrupted.write_text("\n".join(line if i % 10 else "garbage line" for i, line in enumerate(lines)) + "\n")
    config_file = tmp_path / "pipeline.yaml"  # a run may not override source.path: a config file does
    config_file.write_text(SAMPLE_PROFILE_PATH.read_text().replace("data/ml-100k/u.data", str(corrupted)))
    result = recsys(
        "airflow",
        "dags",
        "test",
        "recsys_weekly",
        "1998-04-23",
        env={**state_env, "RECSYS_CONFIG": str(config_file)},
        check=False,
    )
    assert result.returncode != 0
    states = task_states(state_env)
    assert states["ingest_and_build_interactions"] == "failed" and states["promote"] != "success"
    assert "quarantined" in result.stdout + result.stderr
    # The job exits with the user-error code, so the task fails at once instead of retrying.
    assert "failed on its input" in result.stdout + result.stderr
    after = json.loads(recsys("status", "--json", env=state_env).stdout)
    assert after["version"] == before["version"] and after["run_id"] == before["run_id"]
    assert len([path for path in window_dir(state_env).iterdir() if path.is_dir()]) == 2
    assert json.loads((window_dir(state_env) / "published.json").read_text()) == pointer
    assert tree_hashes(published) == published_files


@pytest.mark.e2e
def test_nightly_dag_folds_the_day_into_the_champion(weekly_dag_run) -> None:
    state_env = weekly_dag_run
    before = json.loads(recsys("status", "--json", env=state_env).stdout)
    # The sample's last day, folded into the weekly champion (trained on all but each user's last items).
    recsys("airflow", "dags", "test", "recsys_nightly", "1998-04-23", env=state_env)
    states = task_states(state_env, "recsys_nightly")
    assert states == {**dict.fromkeys(NIGHTLY_TASKS, "success"), "trigger_full_retrain": "skipped"}
    status = json.loads(recsys("status", "--json", env=state_env).stdout)
    assert status["version"] == before["version"] + 1 and status["kind"] == "refresh"
    assert status["refresh"]["parent_version"] == before["version"]
    assert status["refresh"]["day"] == "1998-04-22"
    # One Spark task ran both data stages; each recorded its own cost.
    for stage in ("ingest_events", "build_interactions", "fold_in"):
        assert status["stages"][stage]["seconds"] > 0, stage
    # The day's users are folded in again (the per-user-last holdout left every user a vector, so
    # none is added here; test_replay covers users who arrive after the weekly run).
    assert status["refresh"]["users_updated"] > 0


@pytest.mark.e2e
@pytest.mark.slow  # a whole-DAG run more on the module's one worker would set `make test`'s length
def test_a_nightly_drifting_from_its_weekly_parent_hands_over_to_a_full_retrain(weekly_dag_run) -> None:
    state_env = weekly_dag_run
    status = json.loads(recsys("status", "--json", env=state_env).stdout)
    # Drift past a bound from the weekly parent: the run says why and hands over to the weekly DAG,
    # whose run for that day exists already (the module's weekly_dag_run), so none is added.
    conf = json.dumps({"config_overrides": {"drift.min_rec_overlap": 1.0}})
    result = recsys("airflow", "dags", "test", "recsys_nightly", "1998-04-23", "-c", conf, env=state_env)
    states = task_states(state_env, "recsys_nightly")
    assert states["escalate_or_continue"] == "success" and states["update_index"] == "skipped"
    assert states["trigger_full_retrain"] == "skipped" and states["promote"] == "skipped"
    output = result.stdout + result.stderr
    assert "drift from the weekly parent: drift_rec_overlap=" in output
    assert "Dag Run already exists, skipping task" in output and "dag_id=recsys_weekly" in output
    weekly_runs = airflow_json("dags", "list-runs", "recsys_weekly", env=state_env)
    assert [run["logical_date"][:10] for run in weekly_runs].count("1998-04-23") == 1
    assert json.loads(recsys("status", "--json", env=state_env).stdout)["version"] == status["version"]


def test_cli_overrides_that_cannot_reach_dag_runs_are_refused(capsys) -> None:
    from recsys_pipeline.cli import main

    assert main(["--set", "als.factors=32", "airflow", "dags", "list"]) == 1
    error = capsys.readouterr().err
    assert (
        error.startswith("recsys: --set als.factors would not reach DAG runs") and "config_overrides" in error
    )


def test_a_backfill_runs_one_week_at_a_time_unless_told_otherwise() -> None:
    from recsys_pipeline.cli import one_run_at_a_time

    backfill = ["backfill", "create", "--dag-id", "recsys_weekly", "--from-date", "1998-03-26"]
    assert one_run_at_a_time(backfill)[-2:] == ["--max-active-runs", "1"]
    assert one_run_at_a_time([*backfill, "--max-active-runs=3"]) == [*backfill, "--max-active-runs=3"]
    assert one_run_at_a_time(["dags", "list"]) == ["dags", "list"]


# Airflow's own engine on the state's database: a transaction that opens a savepoint, reads and then
# writes (as creating a backfill's runs does), started while another connection holds the write lock.
SAVEPOINT_READ_THEN_WRITE = """
import sys
from sqlalchemy import text
from airflow.utils.session import create_session
print("ready", flush=True)
sys.stdin.readline()
with create_session() as session, session.begin_nested():
    session.execute(text("SELECT count(*) FROM probe")).scalar()
    session.execute(text("INSERT INTO probe VALUES (2)"))
"""


@pytest.mark.e2e
def test_airflow_on_the_state_waits_for_sqlite_locks_and_a_deployment_keeps_its_database(
    tmp_path: Path, monkeypatch
) -> None:
    """The scheduler and a backfill writing at once must wait for each other's lock: SQLite fails a
    transaction that read first and then writes at once, whatever its busy timeout."""
    for name in ("AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"):
        monkeypatch.delenv(name, raising=False)
    env = airflow_environment(load_config(overrides={"state_dir": str(tmp_path)}), None)
    database = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    database.parent.mkdir(parents=True)
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")  # as Airflow sets it
    writer.execute("CREATE TABLE probe (n INTEGER)")
    probe = subprocess.Popen(
        [sys.executable, "-c", SAVEPOINT_READ_THEN_WRITE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert probe.stdout.readline().strip() == "ready", probe.communicate()[1][-2000:]
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO probe VALUES (1)")
    probe.stdin.write("go\n")
    probe.stdin.flush()
    time.sleep(2)  # the probe's transaction begins while the write lock is held
    writer.execute("COMMIT")
    _, errors = probe.communicate(timeout=120)
    assert probe.returncode == 0, errors[-2000:]
    assert sorted(writer.execute("SELECT n FROM probe").fetchall()) == [(1,), (2,)]
    writer.close()
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://airflow.internal/airflow")
    assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS" not in airflow_environment(load_config(), None)


def test_a_custom_api_port_tells_tasks_where_the_execution_api_is(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__PORT", "18093")
    monkeypatch.delenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", raising=False)
    env = airflow_environment(load_config(), None)
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://localhost:18093/execution/"
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "http://api.internal:9000/execution/")
    assert airflow_environment(load_config(), None)["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].startswith(
        "http://api.internal"
    )


# An object in a reference cycle is finalized only by the collector's walk: at exit, only if it walks.
CYCLE_AT_EXIT = """
import gc
gc.disable()
{imports}
class Cycle:
    def __del__(self):
        print("collected at exit", flush=True)
cycle = Cycle()
cycle.self = cycle
del cycle
"""


@pytest.mark.e2e
def test_a_process_that_loads_the_dags_skips_the_collectors_walk_at_exit() -> None:
    def exit_output(imports: str) -> str:
        script = CYCLE_AT_EXIT.format(imports=imports)
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout

    assert exit_output("") == "collected at exit\n"
    assert exit_output("import recsys_pipeline.orchestration") == ""
