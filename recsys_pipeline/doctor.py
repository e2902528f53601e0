"""``recsys doctor``: whether this machine can run the pipeline's tasks as configured, one line per
check, so a deployment's problem shows before a run fails on it.

Each check answers OK, WARN (works, but something a deployment usually wants is missing) or FAIL;
the command exits 1 when any check fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from recsys_pipeline import tracking
from recsys_pipeline.config import ALERTS_CONN_ID, PipelineConfig
from recsys_pipeline.redaction import redact_text
from recsys_pipeline.state import StateLayout

Status = Literal["OK", "WARN", "FAIL"]
MIN_JAVA = 17


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str

    def line(self) -> str:
        return f"{self.status:<4}  {self.check:<20}  {redact_text(self.detail)}"


def run_checks(config: PipelineConfig, airflow_env: dict[str, str]) -> list[Finding]:
    """Every check, in the order a deployment depends on them; a check that raises fails."""
    checks: list[tuple[str, Callable[[], tuple[Status, str]]]] = [
        ("state folder", lambda: check_state_folder(config)),
        ("locks", lambda: check_locks(config)),
        ("java", check_java),
        ("packages", check_packages),
        ("spark", lambda: check_spark(config)),
        ("spark archive", check_spark_archive),
        ("mlflow", lambda: check_mlflow(config)),
        ("airflow pool", lambda: check_airflow(["pools", "get", config.spark.pool], airflow_env)),
        (
            "airflow spark conn",
            lambda: check_airflow(["connections", "get", config.spark.conn_id], airflow_env),
        ),
        ("airflow alerts conn", lambda: check_alerts(airflow_env)),
    ]
    findings = []
    for name, check in checks:
        try:
            status, detail = check()
        except Exception as error:  # a check that cannot even run is a failed check, said in one line
            status, detail = "FAIL", f"{type(error).__name__}: {error}"
        findings.append(Finding(name, status, detail.splitlines()[0] if detail else ""))
    return findings


def check_state_folder(config: PipelineConfig) -> tuple[Status, str]:
    """A file can be written, synced, read back and removed in the state folder."""
    home = config.state_home
    home.mkdir(parents=True, exist_ok=True)
    probe = home / f".doctor-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    token = uuid.uuid4().hex
    with probe.open("w") as handle:
        handle.write(token)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        if probe.read_text() != token:
            return "FAIL", f"{home}: a file written there read back differently"
    finally:
        probe.unlink()
    return "OK", f"{home} is writable from {socket.gethostname()}"


def check_locks(config: PipelineConfig) -> tuple[Status, str]:
    holder = StateLayout.of(config).probe_lock()
    where = config.locks.backend if config.locks.backend == "flock" else f"postgres at {config.locks.dsn}"
    return "OK", f"{where}: the state lock is {holder}"


def check_java() -> tuple[Status, str]:
    java = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else Path("java")
    try:
        shown = subprocess.run([str(java), "-version"], capture_output=True, text=True, timeout=60).stderr
    except FileNotFoundError:
        return "FAIL", f"no {java}: install Java {MIN_JAVA}+ or set JAVA_HOME (Spark needs it)"
    found = re.search(r'version "(\d+)', shown)
    major = int(found.group(1)) if found else 0
    if major < MIN_JAVA:
        return "FAIL", f"{java} is Java {major or 'unknown'}; Spark 4 needs {MIN_JAVA}+"
    return "OK", f"Java {major} ({java})"


def check_packages() -> tuple[Status, str]:
    """Python and every installed dependency of the pipeline fit what the package requires."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    if sys.version_info[:2] != (3, 11):
        return "FAIL", f"Python {sys.version.split()[0]}; the pipeline needs 3.11"
    unmet = []
    for spec in requires("recsys-pipeline") or []:
        requirement = Requirement(spec)
        marker = requirement.marker
        if marker is not None and not any(
            marker.evaluate({"extra": extra}) for extra in ("client", "pipeline")
        ):
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            unmet.append(f"{requirement.name} missing")
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            unmet.append(f"{requirement.name} {installed} (needs {requirement.specifier})")
    if unmet:
        return "FAIL", "; ".join(unmet) + ": pip install 'recsys-pipeline[pipeline]'"
    return (
        "OK",
        f"Python {sys.version.split()[0]}, recsys-pipeline {version('recsys-pipeline')} and its dependencies",
    )


def check_spark(config: PipelineConfig) -> tuple[Status, str]:
    """A standalone master answers on its port; a local master needs nothing; others are not probed."""
    master = config.spark.master
    if master.startswith("local"):
        return "OK", f"{master}: Spark runs inside each task"
    if not master.startswith("spark://"):
        return "WARN", f"{master}: not probed (yarn, k8s: check with the cluster's own tools)"
    unreachable = []
    for address in master.removeprefix("spark://").split(","):
        host, _, port = address.partition(":")
        try:
            socket.create_connection((host, int(port or 7077)), timeout=5).close()
        except OSError as error:
            unreachable.append(f"{address} ({error})")
    if unreachable:
        return "FAIL", f"{master}: no answer from {', '.join(unreachable)}"
    return "OK", f"{master} answers"


def check_spark_archive() -> tuple[Status, str]:
    """This machine's archive of the Spark driver's classes exists (each job starts ~3 s sooner)."""
    from recsys_pipeline.spark import class_archive, failure_record

    archive = class_archive()
    if archive.is_file():
        return "OK", f"{archive}: every Spark driver here starts from it"
    failed = failure_record(archive)
    if failed.is_file():
        return "WARN", json.loads(failed.read_text())["outcome"]
    return (
        "WARN",
        "none for this JDK and Spark: `recsys spark-archive` makes it (each Spark job starts ~3 s sooner)",
    )


def check_mlflow(config: PipelineConfig) -> tuple[Status, str]:
    """The tracking server answers, and an artifact stored through it comes back (the run is deleted)."""
    bound = tracking.client(config)
    experiment = tracking.experiment_id(bound, config)
    run = bound.create_run(experiment, run_name="recsys doctor", tags={"recsys_doctor": "true"})
    try:
        token = uuid.uuid4().hex
        bound.log_text(run.info.run_id, token, "doctor/probe.txt")
        with tempfile.TemporaryDirectory() as staging:
            stored = Path(bound.download_artifacts(run.info.run_id, "doctor/probe.txt", staging))
            if stored.read_text() != token:
                return "FAIL", f"{tracking.display_uri(config)}: an artifact came back changed"
    finally:
        bound.delete_run(run.info.run_id)
    scheme = run.info.artifact_uri.split(":")[0]
    return "OK", f"{tracking.display_uri(config)} answers and stores artifacts ({scheme})"


def check_airflow(arguments: list[str], env: dict[str, str]) -> tuple[Status, str]:
    """An Airflow object the DAGs need exists, as this worker's Airflow CLI sees it."""
    airflow = str(Path(sys.executable).parent / "airflow")
    shown = subprocess.run(
        [airflow, *arguments, "-o", "json"], capture_output=True, text=True, env=env, timeout=300
    )
    if shown.returncode != 0:
        reason = (shown.stderr.strip().splitlines() or ["no output"])[-1]
        return "FAIL", f"`airflow {' '.join(arguments)}` failed: {reason}"
    try:
        json.loads(shown.stdout)
    except ValueError:
        return "FAIL", f"`airflow {' '.join(arguments)}` printed no JSON"
    return "OK", f"{arguments[-1]} exists"


def check_alerts(env: dict[str, str]) -> tuple[Status, str]:
    status, detail = check_airflow(["connections", "get", ALERTS_CONN_ID], env)
    if status == "FAIL":
        return "WARN", f"no connection {ALERTS_CONN_ID}: a failed task's alert is only logged"
    return status, detail
