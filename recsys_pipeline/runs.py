"""Where each stage reads and writes: fixed locations derived from a run's data interval.

Every stage writes into a temporary sibling and renames it into place on success, so
a crashed stage never leaves a half-written output and re-running a stage is safe.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from recsys_pipeline.config import PipelineConfig, load_config


def parse_instant(value: str | datetime) -> datetime:
    """A plain, aware UTC datetime from an ISO string or any datetime (naive means UTC).

    Airflow hands over pendulum datetimes, whose time zone Arrow does not recognise in filters.
    """
    instant = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return datetime.fromtimestamp(instant.timestamp(), tz=UTC)


@dataclass(frozen=True)
class StateLayout:
    """The folders under the state home shared by all runs."""

    home: Path

    @property
    def events_lake(self) -> Path:
        return self.home / "lake" / "events"

    @property
    def quarantine(self) -> Path:
        return self.home / "lake" / "quarantine"

    @property
    def id_maps(self) -> Path:
        return self.home / "id_maps"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def model_cache(self) -> Path:
        return self.home / "cache" / "models"

    @property
    def bench(self) -> Path:
        return self.home / "bench"


RunMode = Literal["full", "refresh"]


@dataclass(frozen=True)
class RunContext:
    """One pipeline run: its configuration, identity and data interval [start, end).

    ``mode`` is ``full`` for a retrain (the weekly DAG: re-ingest history, hold out the last
    days for evaluation) and ``refresh`` for a fold-in (the nightly DAG: ingest only the
    interval, fold the whole history into the champion's model).
    """

    config: PipelineConfig
    dag_id: str
    run_id: str
    interval_start: datetime
    interval_end: datetime
    mode: RunMode = "full"

    @classmethod
    def create(
        cls,
        config: PipelineConfig,
        dag_id: str,
        interval_start: str | datetime,
        interval_end: str | datetime,
        run_id: str | None = None,
        mode: RunMode = "full",
    ) -> RunContext:
        start, end = parse_instant(interval_start), parse_instant(interval_end)
        if end <= start:
            raise ValueError(
                f"data interval end {end.isoformat()} is not after its start {start.isoformat()}"
            )
        return cls(config, dag_id, run_id or f"manual__{end.isoformat()}", start, end, mode)

    @classmethod
    def from_airflow(cls, context: Mapping[str, Any], mode: RunMode = "full") -> RunContext:
        """The run described by an Airflow task context; ``params.config_overrides`` override the config."""
        overrides = dict(context["params"].get("config_overrides") or {})
        return cls.create(
            load_config(overrides=overrides),
            context["dag"].dag_id,
            context["data_interval_start"],
            context["data_interval_end"],
            context["run_id"],
            mode,
        )

    @property
    def layout(self) -> StateLayout:
        return StateLayout(self.config.state_home)

    @property
    def interval_key(self) -> str:
        return f"{self.interval_start:%Y-%m-%dT%H%M}_{self.interval_end:%Y-%m-%dT%H%M}"

    @property
    def run_key(self) -> str:
        """Identifies the run across re-runs of the same DAG and interval (MLflow tags use it)."""
        return f"{self.dag_id}/{self.interval_key}"

    @property
    def run_dir(self) -> Path:
        return self.layout.home / "runs" / self.dag_id / self.interval_key

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def write_metrics(self, stage: str, metrics: dict[str, float]) -> None:
        write_json(self.run_dir / "metrics" / f"{stage}.json", metrics)

    def read_metrics(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for path in sorted((self.run_dir / "metrics").glob("*.json")):
            merged.update(json.loads(path.read_text()))
        return merged

    def write_gate(self, gate: str, passed: bool, reasons: list[str], **details: Any) -> None:
        write_json(self.run_dir / "gates" / f"{gate}.json", {"passed": passed, "reasons": reasons, **details})

    def read_gates(self) -> dict[str, dict[str, Any]]:
        return {
            path.stem: json.loads(path.read_text())
            for path in sorted((self.run_dir / "gates").glob("*.json"))
        }


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        yield staging
        backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        if target.exists():
            target.rename(backup)
        staging.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    staging.replace(path)


def now_utc() -> datetime:
    return datetime.now(UTC)
