"""`recsys forget` end to end on a source with distinctive ids: after a weekly and a nightly run, one
user is forgotten by the recsys_forget DAG; no file of the state or the artifact store names them,
services answer for them as for a stranger, and the next weekly does not bring them back although
the source still holds their events."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from recsys_pipeline.cli import airflow_environment
from recsys_pipeline.config import PROJECT_ROOT, load_config
from recsys_pipeline.erasure import ErasureLedger, verify
from recsys_pipeline.state import StateLayout
from tests.test_dags import airflow_json, recsys, task_states

pytestmark = pytest.mark.slow

GONE = "user-000196"


def distinctive_source(path: Path) -> None:
    """The bundled sample with ids a search can tell apart (``user-000196``), and one broken record
    of the user to forget: quarantined, with their id in its raw form."""
    rows = (PROJECT_ROOT / "data" / "ml-100k" / "u.data").read_text().splitlines()
    lines = []
    for row in rows:
        user, item, rating, ts = row.split("\t")
        lines.append(f"user-{int(user):06d}\t{item}\t{rating}\t{ts}")
    lines.append(f"{GONE}\t50\tfive stars\t892000000")
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def forget_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("forget")
    home = root / "home"
    distinctive_source(root / "events.tsv")
    sample = yaml.safe_load((PROJECT_ROOT / "conf" / "sample.yaml").read_text())
    sample["source"]["path"] = str(root / "events.tsv")
    sample["source"]["name"] = "distinctive-ids"
    sample["content"]["source"]["path"] = str(PROJECT_ROOT / "data" / "ml-100k" / "u.item")
    profile = root / "profile.yaml"
    profile.write_text(yaml.safe_dump(sample))
    config = load_config(profile, overrides={"state_dir": str(home)})
    env = airflow_environment(config, str(profile)) | {
        "RECSYS_HOME": str(home),
        "RECSYS_CONFIG": str(profile),
    }
    env["AIRFLOW_HOME"] = str(home / "airflow")
    env["AIRFLOW_CONN_RECSYS_SPARK"] = json.dumps({"conn_type": "spark", "host": "local[2]"})
    recsys("airflow", "db", "migrate", env=env)
    return env


def test_a_forgotten_user_is_gone_everywhere_and_stays_gone(forget_env: dict[str, str]) -> None:
    env = forget_env
    home = Path(env["RECSYS_HOME"])
    config = load_config(env["RECSYS_CONFIG"], overrides={"state_dir": str(home)})
    recsys("airflow", "dags", "test", "recsys_weekly", "1998-04-16", env=env)
    recsys("airflow", "dags", "test", "recsys_nightly", "1998-04-17", env=env)
    before = json.loads(recsys("status", "--json", env=env).stdout)
    assert before["kind"] == "refresh"
    stranger = recsys("recommend", "--user-id", "user-999999", env=env, check=False)
    assert stranger.returncode == 1 and "unknown user id 'user-999999'" in stranger.stderr
    assert json.loads(recsys("recommend", "--user-id", GONE, "--json", env=env).stdout)

    result = recsys("forget", "--user-id", GONE, "--reason", "GDPR Art. 17 request", env=env)
    assert "verified" in result.stdout
    assert task_states(env, "recsys_forget") == {
        "erase_state": "success",
        "republish": "success",
        "verify_erasure": "success",
    }
    # The run's conf carries the request's id only.
    (run,) = airflow_json("dags", "list-runs", "recsys_forget", env=env)
    assert GONE not in json.dumps(run)
    (request,) = ErasureLedger(StateLayout(home)).requests()
    report = json.loads(
        (home / "runs" / "recsys_forget" / request.request_id / "report" / "report.json").read_text()
    )
    erased = report["erased"]["state"]
    assert erased["events_erased"] > 0 and erased["quarantine_records_erased"] == 1
    assert erased["ids_tombstoned"] == 1 and 0 < erased["lake_partitions_rewritten"] < 100
    assert report["findings"] == [] and report["checked"]["state folder"]["files"] > 100

    status = json.loads(recsys("status", "--json", env=env).stdout)
    assert status["kind"] == "erasure"
    assert status["erasure"] == {"copy_of_version": before["version"], "request_id": request.request_id}
    assert status["refresh"]["parent_version"] != before["refresh"]["parent_version"]  # the weekly's copy
    versions = {row["version"]: row for row in json.loads(recsys("versions", "--json", env=env).stdout)}
    assert versions[before["version"]]["tags"]["artifacts_erased_by"] == request.request_id
    forgotten = ErasureLedger(StateLayout(home)).forgotten()
    assert forgotten is not None
    assert verify([home], forgotten, skip=[home / "erasure"]).clean
    answer = recsys("recommend", "--user-id", GONE, env=env, check=False)
    assert answer.returncode == 1 and f"unknown user id {GONE!r}" in answer.stderr
    recsys("rollback", "--reason", "check the previous champion", env=env)
    rolled_back = json.loads(recsys("status", "--json", env=env).stdout)
    assert rolled_back["kind"] == "erasure"  # the previous champion is a copy without the user too
    recsys("rollback", "--reason", "back", env=env)

    # A nightly reads the rewritten lake files back through Spark.
    recsys("airflow", "dags", "test", "recsys_nightly", "1998-04-18", env=env)
    assert json.loads(recsys("status", "--json", env=env).stdout)["kind"] == "refresh"

    # The next weekly re-reads the source file, which still holds the user's events: erased on the way in.
    recsys("airflow", "dags", "test", "recsys_weekly", "1998-04-23", env=env)
    after = json.loads(recsys("status", "--json", env=env).stdout)
    assert after["kind"] == "full" and after["metrics"]["events_erased_at_ingest"] > 0
    assert verify([home], forgotten, skip=[home / "erasure"]).clean
    users = pq.read_table(home / "id_maps" / "users")
    assert users.num_rows == len(set(users.column("idx").to_pylist()))
    assert users.column("id").null_count == 1
    assert config.erasure.retain_versions  # the default

    # A second request, recorded first and run later: the copies of the first request are copied
    # again (the previous champion is the nightly's copy, which folds against its weekly's copy).
    # ... and with erasure.retain_versions false (each task reads the profile as it is when it runs):
    # versions neither copied nor already emptied by the first request are deleted.
    profile = Path(env["RECSYS_CONFIG"])
    profile.write_text(
        yaml.safe_dump({**yaml.safe_load(profile.read_text()), "erasure": {"retain_versions": False}})
    )
    listed = {row["version"] for row in json.loads(recsys("versions", "--json", env=env).stdout)}
    second = "user-000197"
    recorded = recsys("forget", "--user-id", second, "--record-only", env=env)
    request_id = recorded.stdout.split("recorded erasure request ")[1].split()[0]
    recsys("forget", "--request-id", request_id, env=env)
    republished = json.loads((home / "runs" / "recsys_forget" / request_id / "republish.json").read_text())
    assert len(republished["copies"]) == 3  # the weekly champion, the previous (a nightly's copy), its parent
    copies = {int(copy) for copy in republished["copies"].values()}
    emptied_before = {before["version"], before["refresh"]["parent_version"]}  # by the first request
    remaining = {row["version"] for row in json.loads(recsys("versions", "--json", env=env).stdout)}
    assert remaining == emptied_before | copies and max(listed) < min(copies)
    final = json.loads(recsys("status", "--json", env=env).stdout)
    assert final["erasure"] == {"copy_of_version": after["version"], "request_id": request_id}
    everyone = ErasureLedger(StateLayout(home)).forgotten()
    assert everyone is not None and everyone.matches(second) and everyone.matches(GONE)
    assert verify([home], everyone, skip=[home / "erasure"]).clean
    # Two tombstones now: a weekly over them validates and publishes as any other.
    recsys("airflow", "dags", "test", "recsys_weekly", "1998-04-23", env=env)
    assert json.loads(recsys("status", "--json", env=env).stdout)["kind"] == "full"
    assert pq.read_table(home / "id_maps" / "users").column("id").null_count == 2
    recsys("rollback", "--reason", "the previous champion must load", env=env)
    assert json.loads(recsys("recommend", "--user-id", "user-000001", "--json", env=env).stdout)
