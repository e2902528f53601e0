"""The ``recsys`` command line: query what the pipeline published; run Airflow on the local state."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys_pipeline.config import (
    DEFAULT_CONFIG_PATH,
    PROJECT_ROOT,
    SAMPLE_PROFILE_PATH,
    ConfigError,
    PipelineConfig,
    load_config,
    parse_override,
)
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.redaction import redact_text
from recsys_pipeline.state import StateLayout
from recsys_pipeline.synthetic import CONTENT_SOURCE, SOURCE_MAPPING, SyntheticSpec

# MLflow (the registry), pandas and the generator's writers are imported by the commands that use
# them: `recsys airflow` starts every DAG run, and MLflow's import alone took 1.2 s of that start.
if TYPE_CHECKING:
    import pandas as pd


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    parser.add_argument(
        "--config",
        help=f"profile YAML layered over {DEFAULT_CONFIG_PATH.name} (default: $RECSYS_CONFIG or "
        f"{SAMPLE_PROFILE_PATH.name}, the bundled sample)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config field (repeatable)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    status = commands.add_parser("status", help="the version behind the champion alias and its metrics")
    status.add_argument("--json", action="store_true")

    recommend = commands.add_parser(
        "recommend", help="top-k items for a user, or for a session's recent items, from the champion"
    )
    recommend.add_argument("--user-id")
    recommend.add_argument(
        "--recent-item-ids",
        type=lambda value: [item for item in value.split(",") if item],
        help="a session's recent item ids, comma-separated (with --user-id: blended with the user's vector)",
    )
    recommend.add_argument("-k", type=int, default=10)
    recommend.add_argument("--json", action="store_true")

    similar = commands.add_parser("similar", help="items most similar to an item, from the champion")
    similar.add_argument("--item-id", required=True)
    similar.add_argument("-k", type=int, default=10)
    similar.add_argument("--json", action="store_true")

    versions = commands.add_parser("versions", help="every registered version with aliases, tags and metrics")
    versions.add_argument("--json", action="store_true")

    promote = commands.add_parser("promote", help="make a version the champion by hand")
    promote.add_argument("--version", required=True)
    promote.add_argument("--reason", default="manual promotion")

    rollback = commands.add_parser("rollback", help="make the previous champion the champion again")
    rollback.add_argument("--reason", default="manual rollback")

    airflow = commands.add_parser(
        "airflow", help="run the airflow CLI on the local state (AIRFLOW_HOME, DAGs folder, Spark connection)"
    )
    airflow.add_argument("airflow_args", nargs=argparse.REMAINDER)

    replay = commands.add_parser(
        "replay",
        help="run the weekly DAG every seventh day of a range and the nightly DAG on the days between, "
        "one run at a time in date order, and report what each did or would have done (HTML with "
        "plots, logged to MLflow)",
    )
    for flag, dest, meaning in (
        ("--from", "start", "the first day (a weekly run's window end)"),
        ("--to", "end", "the last day"),
    ):
        replay.add_argument(flag, dest=dest, required=True, type=date.fromisoformat, help=meaning)
    replay.add_argument(
        "--promote", action="store_true", help="let passing runs move champion (default: dry runs)"
    )
    replay.add_argument("--weekly-only", action="store_true", help="no nightly runs between the weeks")

    serve = commands.add_parser(
        "serve", help="serve the version behind an alias over REST (MLflow's /invocations contract)"
    )
    serve.add_argument("--port", type=int, default=5001)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--alias", default="champion")
    serve.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    serve.add_argument(
        "--watch-interval",
        type=float,
        default=60.0,
        help="seconds between checks of the alias (a new version is verified, then swapped in; 0: never)",
    )

    commands.add_parser(
        "doctor",
        help="check that this machine can run the pipeline as configured: state folder, locks, Java, "
        "packages, Spark, MLflow, Airflow (exit 1 on a failure)",
    )

    synth = commands.add_parser("synth", help="write a synthetic event log (Parquet) usable as a source")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument(
        "--items-out", type=Path, help="also write item metadata (category, title) to this Parquet file"
    )
    for name, default in SyntheticSpec().as_dict().items():
        if name != "chunk_events":
            synth.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)

    forget = commands.add_parser(
        "forget",
        help="erase users everywhere (lake, ID maps, run folders, published versions): record the "
        "request in the erasure ledger (salted hashes, never the ids) and run the recsys_forget DAG",
    )
    forget.add_argument("--user-id", action="append", default=[], help="a user id to forget (repeatable)")
    forget.add_argument("--user-ids-file", type=Path, help="a file of user ids to forget, one per line")
    forget.add_argument("--reason", default="", help="why (kept in the ledger)")
    forget.add_argument("--request-id", help="run a request recorded earlier instead of recording one")
    forget.add_argument(
        "--record-only", action="store_true", help="record the request; run the DAG later with --request-id"
    )
    forget.add_argument(
        "--trigger",
        action="store_true",
        help="queue the DAG run on the Airflow deployment's scheduler instead of running it here",
    )

    commands.add_parser("mlflow-ui", help="print the command that opens the MLflow UI on the local state")
    content_hash = commands.add_parser(
        "content-hash",
        help="print the sha256 a local sentence-transformers folder goes by in content.sentence",
    )
    content_hash.add_argument("model_dir", type=Path)
    commands.add_parser(
        "spark-archive",
        help="archive the Spark driver's classes for this JDK and Spark (once; `make init` runs it): "
        "every Spark job then starts about 3 s sooner",
    )
    return parser


# The only overrides `recsys airflow` can hand to DAG runs: where the state lives (RECSYS_HOME) and the
# Spark master (the Spark connection). Every other field is read by the tasks from their own config.
REACHES_AIRFLOW = frozenset({"state_dir", "spark.master", "spark.pool_slots"})


def airflow_environment(config: PipelineConfig, config_path: str | None) -> dict[str, str]:
    """Environment for Airflow on the project's state; values already set by a deployment win."""
    home = config.state_home
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    defaults = {
        "RECSYS_HOME": str(home),
        "AIRFLOW_HOME": str(StateLayout(home).airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "OPENBLAS_NUM_THREADS": "1",
        f"AIRFLOW_CONN_{config.spark.conn_id.upper()}": json.dumps(
            {"conn_type": "spark", "host": config.spark.master}
        ),
    }
    if config.spark.master.startswith("local"):
        # A local Spark binds to loopback without first warning that the hostname resolves there.
        defaults["SPARK_LOCAL_IP"] = "127.0.0.1"
    if not {"AIRFLOW_HOME", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"} & set(env):
        # Only Airflow on the state's own SQLite database: a deployment's database takes its own.
        defaults["AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS"] = (
            "recsys_pipeline.airflow_sqlite.CONNECT_ARGS"
        )
    if config_path:
        defaults["RECSYS_CONFIG"] = str(Path(config_path).resolve())
    # Tasks report to the API server's execution API: on a custom port they must be told where it is.
    port = env.get("AIRFLOW__API__PORT")
    if port:
        defaults["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://localhost:{port}/execution/"
    for key, value in defaults.items():
        env.setdefault(key, value)
    return env


def refuse_unreached(overrides: Mapping[str, Any]) -> None:
    """``--set`` values that DAG runs would never see are refused rather than silently dropped."""
    unreached = sorted(set(overrides) - REACHES_AIRFLOW)
    if unreached:
        raise ConfigError(
            f"--set {', '.join(unreached)} would not reach DAG runs, which read their own config: pass "
            "them as the run's config_overrides (airflow dags trigger|test -c "
            '\'{"config_overrides": {"section.key": value}}\') or in the file RECSYS_CONFIG names'
        )


def one_run_at_a_time(airflow_args: list[str]) -> list[str]:
    """A backfill replays history in date order, one run at a time: Airflow's own default (10 at
    once) overrides the DAGs' ``max_active_runs``, so it is set unless the user set it."""
    if airflow_args[:2] == ["backfill", "create"] and not any(
        arg.startswith("--max-active-runs") for arg in airflow_args
    ):
        return [*airflow_args, "--max-active-runs", "1"]
    return airflow_args


def _print_table(frame: pd.DataFrame, as_json: bool) -> None:
    if as_json:
        print(json.dumps(frame.to_dict(orient="records"), indent=2))
    else:
        print(frame.to_string(index=False))


def _status(config: PipelineConfig, as_json: bool) -> None:
    from recsys_pipeline.registry import Registry

    status = Registry(config).champion_status()
    if as_json:
        print(json.dumps(status, indent=2))
        return
    window = status["data_window"]
    print(f"{status['model']} version {status['version']} (aliases: {', '.join(status['aliases'])})")
    print(f"  data window: {window['start']} -> {window['end']}   created: {status['created_at']}")
    erasure = status.get("erasure")
    if erasure:
        print(
            f"  copy of version {erasure['copy_of_version']} without the users erasure request "
            f"{erasure['request_id']} named (recsys forget)"
        )
    refresh = status.get("refresh")
    if refresh:
        print(
            f"  nightly refresh of {refresh['day']} on weekly version {refresh['parent_version']} "
            f"(folded into version {refresh['derived_from_version']}): {refresh['users_updated']} users "
            f"updated, {refresh['users_added']} added, {refresh['items_added']} items added "
            f"in {refresh['refresh_s']:.2f}s"
        )
    k = config.evaluation.k
    for name in (
        f"ndcg_at_{k}",
        f"baseline_ndcg_at_{k}",
        f"precision_at_{k}",
        f"recall_at_{k}",
        f"map_at_{k}",
        f"coverage_at_{k}",
        f"index_recall_at_{k}",
    ):
        if name in status["metrics"]:
            low, high = status["metrics"].get(f"{name}_ci_low"), status["metrics"].get(f"{name}_ci_high")
            interval = f"  [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
            print(f"  {name:<22} {status['metrics'][name]:.4f}{interval}")
    metrics = status["metrics"]
    if "events_read" in metrics:
        print(
            f"  records: {metrics['events_read']:.0f} read = {metrics['events_ingested']:.0f} ingested"
            f" + {metrics['events_quarantined']:.0f} quarantined"
            + (
                f" + {metrics['events_erased_at_ingest']:.0f} erased (recsys forget)"
                if metrics.get("events_erased_at_ingest")
                else ""
            )
            + f" + {metrics['events_outside_window']:.0f} outside the window"
        )
    if status["stages"]:
        costs = ", ".join(
            f"{task} {cost['seconds']:.0f}s/{cost['peak_rss_mb']:.0f}MB"
            for task, cost in status["stages"].items()
        )
        print(f"  stages (time/peak memory): {costs}")
    dropped = {name: value for name, value in metrics.items() if name.startswith("dropped_pairs_")}
    if dropped:
        reasons = ", ".join(
            f"{value:.0f} {name.removeprefix('dropped_pairs_')}" for name, value in dropped.items()
        )
        print(f"  training pairs: {metrics.get('train_interactions', 0):.0f} kept, dropped: {reasons}")


def _registry_command(config: PipelineConfig, args: argparse.Namespace) -> int:
    from recsys_pipeline.registry import Registry

    if args.command == "versions":
        rows = Registry(config).list_versions()
        if args.json:
            print(json.dumps(rows, indent=2))
        ndcg_name = f"ndcg_at_{config.evaluation.k}"
        for row in [] if args.json else rows:
            ndcg = row["metrics"].get(ndcg_name, float("nan"))
            print(
                f"{row['version']:>4}  {ndcg_name}={ndcg:.4f}  {','.join(row['aliases']) or '-'}  "
                f"{row['tags'].get('run_key', '')}"
            )
    elif args.command == "promote":
        Registry(config).promote(args.version, reason=args.reason)
        print(f"{config.mlflow.model_name}@champion -> version {args.version}")
    else:
        version = Registry(config).rollback(reason=args.reason)
        print(f"{config.mlflow.model_name}@champion -> version {version} (rolled back)")
    return 0


def _forget(config: PipelineConfig, args: argparse.Namespace) -> int:
    """Record an erasure request (or take a recorded one) and run ``recsys_forget`` for it, in this
    process (``airflow dags test``) or on the scheduler (``--trigger``). Only the request's id reaches
    Airflow."""
    import subprocess

    from recsys_pipeline.erasure import ErasureError, ErasureLedger

    ledger = ErasureLedger(StateLayout.of(config))
    if args.request_id is not None:
        if args.user_id or args.user_ids_file:
            raise ErasureError("--request-id runs a recorded request: give it no user ids")
        request_id = ledger.request(args.request_id).request_id
    else:
        ids = list(args.user_id)
        if args.user_ids_file is not None:
            if not args.user_ids_file.is_file():
                raise ErasureError(f"--user-ids-file {args.user_ids_file} is not a file")
            ids += args.user_ids_file.read_text().splitlines()
        request = ledger.record(ids, args.reason)
        request_id = request.request_id
        print(f"recorded erasure request {request_id} ({len(request.user_hashes)} user(s))")
    if args.record_only:
        print(f"run it with: recsys forget --request-id {request_id}")
        return 0
    env = airflow_environment(config, args.config)
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).parent / "airflow")
    conf = json.dumps({"request_id": request_id})
    command = ["dags", "trigger" if args.trigger else "test", "recsys_forget", "--conf", conf]
    code = subprocess.call([airflow, *command], env=env)
    if code == 0 and not args.trigger:
        report = (
            StateLayout.of(config).home / "runs" / "recsys_forget" / request_id / "report" / "report.html"
        )
        print(f"erasure {request_id} verified; report: {report}")
    return code


def _serve(args: argparse.Namespace, overrides: dict[str, Any]) -> int:
    """Serve the version behind the alias over REST (see :mod:`recsys_pipeline.rest`)."""
    from recsys_pipeline.rest import serve

    serve(args.host, args.port, args.alias, args.config, overrides, args.workers, args.watch_interval)
    return 0


def run(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    overrides = dict(parse_override(item) for item in args.set)
    config = load_config(args.config, overrides)
    if args.command == "airflow":
        import subprocess

        refuse_unreached(overrides)
        env = airflow_environment(config, args.config)
        Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
        airflow = str(Path(sys.executable).parent / "airflow")
        code = subprocess.call([airflow, *one_run_at_a_time(args.airflow_args)], env=env)
        if code == 0 and args.airflow_args[:2] == ["db", "migrate"]:
            pool = [config.spark.pool, str(config.spark.pool_slots), "Spark stages of the recsys DAGs"]
            code = subprocess.call([airflow, "pools", "set", *pool], env=env, stdout=subprocess.DEVNULL)
        return code
    if args.command == "replay":
        from recsys_pipeline.replay import airflow_dags_test, replay

        refuse_unreached(overrides)
        env = airflow_environment(config, args.config)
        report = replay(config, args.start, args.end, args.promote, airflow_dags_test(env), args.weekly_only)
        print(f"replay report: {report / 'report.html'} (also logged to MLflow)")
        return 0
    if args.command == "forget":
        refuse_unreached(overrides)
        return _forget(config, args)
    if args.command == "synth":
        from recsys_pipeline.synthetic import generate, write_item_metadata

        spec = SyntheticSpec(
            **{k: getattr(args, k) for k in SyntheticSpec().as_dict() if k != "chunk_events"}
        )
        files = generate(spec, args.out)
        print(f"wrote {spec.events} events in {files} files to {args.out}; source mapping: {SOURCE_MAPPING}")
        if args.items_out is not None:
            write_item_metadata(spec, args.items_out)
            print(f"wrote {spec.items} items' metadata to {args.items_out}; content source: {CONTENT_SOURCE}")
        return 0
    if args.command == "content-hash":
        from recsys_pipeline.content import folder_sha256

        print(folder_sha256(args.model_dir))
        return 0
    if args.command == "spark-archive":
        from recsys_pipeline.spark import DRIVER_OPTIONS, archive_driver_classes, class_archive

        outcome = archive_driver_classes(config.spark.conf.get(DRIVER_OPTIONS, ""), class_archive())
        print(f"spark-archive: {outcome}")
        return 0
    if args.command == "doctor":
        from recsys_pipeline.doctor import run_checks

        findings = run_checks(config, airflow_environment(config, args.config))
        for finding in findings:
            print(finding.line())
        return 1 if any(finding.status == "FAIL" for finding in findings) else 0
    if args.command == "serve":
        return _serve(args, overrides)
    if args.command == "mlflow-ui":
        print(f"mlflow ui --backend-store-uri {config.tracking_uri} --port 5000")
        return 0
    if args.command == "status":
        _status(config, args.json)
        return 0
    if args.command in ("versions", "promote", "rollback"):
        return _registry_command(config, args)
    from recsys_pipeline.serving import Recommender

    if args.command == "recommend" and args.user_id is None and args.recent_item_ids is None:
        raise RecsysError("recommend needs --user-id, --recent-item-ids or both")
    recommender = Recommender.from_registry(config=config)
    if args.command == "recommend" and args.recent_item_ids is not None:
        _print_table(recommender.for_session(args.recent_item_ids, args.k, user_id=args.user_id), args.json)
    elif args.command == "recommend":
        _print_table(recommender.recommend(args.user_id, args.k), args.json)
    elif args.command == "similar":
        _print_table(recommender.similar(args.item_id, args.k), args.json)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # A person waits at the terminal: an unreachable registry should be reported in seconds, not
    # after MLflow's default retries (minutes). Values the user exported win.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    # Errors meant for users, and registry errors (an unknown version, an unreachable server), are
    # reported in one line; anything else is a bug and keeps its traceback.
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except Exception as error:
        if not (isinstance(error, RecsysError) or _is_mlflow_error(error)):
            raise
        print(f"recsys: {redact_text(str(error))}", file=sys.stderr)
        return 1


def _is_mlflow_error(error: Exception) -> bool:
    """Whether MLflow raised ``error``: only a command that imported MLflow can have."""
    exceptions = sys.modules.get("mlflow.exceptions")
    return exceptions is not None and isinstance(error, exceptions.MlflowException)
