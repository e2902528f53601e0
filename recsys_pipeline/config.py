"""The one typed configuration of the pipeline.

``conf/pipeline.yaml`` holds the pipeline's defaults; a profile is layered over it (the file
``RECSYS_CONFIG`` names, else ``conf/sample.yaml``, the bundled sample's events and item metadata),
and the result is validated into :class:`PipelineConfig`. A profile of your own so never inherits
the sample's description of its data. DAG params and CLI ``--set section.key=value`` flags
override single fields; nothing else holds parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recsys_pipeline.errors import RecsysError
from recsys_pipeline.redaction import has_credentials, is_secret_name, redact_tree, restore_secrets

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "conf" / "pipeline.yaml"
SAMPLE_PROFILE_PATH = PROJECT_ROOT / "conf" / "sample.yaml"
CONFIG_ENV = "RECSYS_CONFIG"  # names the profile when no path is given
ALERTS_CONN_ID = "recsys_alerts"  # the Airflow connection a failed task's alert is posted through
CANONICAL_FIELDS = ("user_id", "item_id", "event_type", "value", "timestamp")


class ConfigError(RecsysError, ValueError):
    """The configuration file is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Section):
    """Where raw events come from and how their columns map onto the canonical schema."""

    name: str = Field(description="Recorded in the `source` column of every ingested event.")
    path: Path
    format: Literal["csv", "parquet"] = "csv"
    delimiter: str = ","
    header: bool = True
    column_names: list[str] | None = Field(
        default=None, description="Names for a header-less CSV, in file order."
    )
    mapping: dict[str, str | None] = Field(
        description="Canonical field (user_id, item_id, event_type, value, timestamp) -> source column."
    )
    default_event_type: str | None = Field(
        default=None, description="Event type for sources without an event-type column."
    )
    timestamp_unit: Literal["s", "ms", "us", "format"] = "s"
    timestamp_format: str | None = Field(default=None, description="Spark datetime pattern when unit=format.")

    @model_validator(mode="after")
    def _mapping_is_complete(self) -> SourceConfig:
        unknown = set(self.mapping) - set(CANONICAL_FIELDS)
        if unknown:
            raise ValueError(f"mapping has unknown canonical fields {sorted(unknown)}")
        for required in ("user_id", "item_id", "timestamp"):
            if not self.mapping.get(required):
                raise ValueError(f"mapping.{required} must name a source column")
        if not self.mapping.get("event_type") and not self.default_event_type:
            raise ValueError("either mapping.event_type or default_event_type must be set")
        if self.timestamp_unit == "format" and not self.timestamp_format:
            raise ValueError("timestamp_format is required when timestamp_unit is 'format'")
        return self


class EventsConfig(_Section):
    event_types: list[str] = ["view", "click", "add_to_cart", "purchase", "rating", "watch"]
    min_event_time: datetime = Field(
        default=datetime(1990, 1, 1), description="Events before this are quarantined as 'before_floor'."
    )
    max_quarantine_share: float = Field(default=0.05, ge=0, le=1)
    max_id_length: int = Field(
        default=256, ge=1, description="Longer user or item ids are quarantined as 'invalid_id'."
    )
    incremental: bool = Field(
        default=True,
        description="A full run reads only source files the lake has not taken in; false re-reads them all.",
    )


class EventWeight(_Section):
    weight: float = Field(default=1.0, ge=0)
    value_map: dict[float, float] | None = Field(
        default=None,
        description="Event value (e.g. a rating) -> multiplier; values between keys interpolate linearly.",
    )
    scale_by_value: bool = Field(default=False, description="Multiply by the raw value (e.g. watch time).")

    @field_validator("value_map")
    @classmethod
    def _value_map_has_points(cls, value: dict[float, float] | None) -> dict[float, float] | None:
        if value is not None and not value:
            raise ValueError("value_map needs at least one value: multiplier pair (or null for none)")
        return value


class HoldoutConfig(_Section):
    """Which interactions of the window are held out to evaluate the run's model."""

    strategy: Literal["days", "share", "per_user_last"] = Field(
        default="per_user_last",
        description=(
            "days: the window's last `days`; share: the most recent `share` of events (one global cut); "
            "per_user_last: each user's `last_n` most recent items, for users with more than that."
        ),
    )
    days: int = Field(default=14, ge=1)
    share: float = Field(default=0.1, gt=0, lt=1)
    last_n: int = Field(default=3, ge=1)

    def describe(self) -> str:
        """The setting in force, as a user would write it."""
        value = {"days": self.days, "share": self.share, "per_user_last": self.last_n}[self.strategy]
        field = {"days": "days", "share": "share", "per_user_last": "last_n"}[self.strategy]
        return f"interactions.holdout.strategy={self.strategy} (interactions.holdout.{field}={value})"


class InteractionsConfig(_Section):
    event_weights: dict[str, EventWeight]
    half_life_days: float | None = Field(
        default=None, gt=0, description="Exponential time decay; off if null."
    )
    aggregation: Literal["sum", "max"] = "sum"
    max_confidence: float = Field(default=100.0, gt=0)
    max_zero_confidence_share: float = Field(
        default=0.05, ge=0, le=1, description="A run dropping more pairs for zero confidence fails."
    )
    min_user_interactions: int = Field(default=1, ge=1)
    min_item_interactions: int = Field(default=1, ge=1)
    holdout: HoldoutConfig = HoldoutConfig()
    history_days: int | None = Field(default=None, ge=1, description="Training window length; all if null.")


TunableParameter = Literal[
    "factors", "regularization", "alpha", "iterations", "popularity_weight", "weighting"
]
Weighting = Literal["bm25", "none"]
WEIGHTINGS: tuple[Weighting, ...] = ("bm25", "none")
DEFAULT_SWEEP_SPACE: dict[TunableParameter, list[float | str]] = {
    "weighting": ["bm25", "none"],
    "regularization": [3.0, 10.0, 30.0],
    "alpha": [1.5, 3.0, 5.0, 10.0],
    "popularity_weight": [0.0, 0.1, 0.2, 0.3, 0.5],
}


class SweepConfig(_Section):
    """A hyperparameter search on a validation split carved from the training matrix."""

    strategy: Literal["grid", "random"] = "grid"
    trials: int | None = Field(
        default=None, ge=1, description="Random: candidates drawn. Grid: null tries every combination."
    )
    seed: int = 0
    validation_share: float = Field(
        default=0.25, gt=0, lt=1, description="Share of each user's training items held out for validation."
    )
    space: dict[TunableParameter, list[float | str]] = Field(
        default_factory=lambda: dict(DEFAULT_SWEEP_SPACE),
        description="Values to try per parameter; parameters left out keep their als value.",
    )
    max_seconds: float | None = Field(
        default=120.0,
        gt=0,
        description="Time box: no trial starts that the last one's duration says would end past this.",
    )
    validation_users: int | None = Field(
        default=10_000, ge=1, description="Validation users scored per trial (a seeded sample)."
    )
    retune_after_days: float | None = Field(
        default=None,
        ge=0,
        description="A weekly keeps the hyperparameters its reference version was tuned to while that "
        "sweep's data ended less than this many days before the run's and the als settings are unchanged; "
        "null: sweep every weekly.",
    )

    @model_validator(mode="after")
    def _space_is_searchable(self) -> SweepConfig:
        empty = sorted(name for name, values in self.space.items() if not values)
        if not self.space or empty:
            raise ValueError(f"sweep.space needs at least one value per listed parameter (empty: {empty})")
        if self.strategy == "random" and self.trials is None:
            raise ValueError("a random sweep needs sweep.trials")
        for name, values in self.space.items():
            categorical = name == "weighting"
            wrong = [v for v in values if (v not in WEIGHTINGS if categorical else isinstance(v, str))]
            if wrong:
                expected = f"one of {list(WEIGHTINGS)}" if categorical else "numbers"
                raise ValueError(f"sweep.space.{name} takes {expected}, not {wrong}")
        return self


def _typed(name: str, value: float | str) -> float | str:
    """A hyperparameter as its field holds it: the weighting by name, counts as integers."""
    if name == "weighting":
        return value
    return int(value) if name in ("factors", "iterations") else float(value)


class AlsConfig(_Section):
    backend: Literal["implicit", "spark"] = Field(
        default="implicit", description="implicit (one node, fast) or spark (Spark MLlib ALS, implicitPrefs)."
    )
    factors: int = Field(default=64, ge=1)
    regularization: float = Field(default=0.05, ge=0)
    alpha: float = Field(default=1.0, gt=0)
    iterations: int = Field(default=15, ge=1)
    popularity_weight: float = Field(
        default=0.0,
        ge=0,
        description="Weight of log(1 + item confidence) added to every score, as one more vector dimension.",
    )
    weighting: Weighting = Field(
        default="none",
        description="bm25: fit BM25 weights of the confidences (saturated, times the item's IDF); "
        "none: the confidences themselves.",
    )
    bm25_k1: float = Field(
        default=1.2, gt=0, description="BM25's saturation: a pair's confidence counts at most k1 + 1."
    )
    bm25_idf_exponent: float = Field(
        default=1.0,
        ge=0,
        description="An item's weight is its IDF to this power: above 1, a pair counts more steeply "
        "the rarer its item (1: BM25's own weight).",
    )
    use_cg: bool = True
    random_state: int = 42
    warm_start_iterations: int | None = Field(
        default=None,
        ge=1,
        description="A weekly that sweeps starts its final fit from the sweep's fit of its choice, one "
        "whose reference version was trained with the same factors, weighting, regularization, alpha "
        "and BM25 settings from its factors, and runs this many iterations; null: always from random "
        "factors, for als.iterations.",
    )
    sweep: SweepConfig | None = Field(default=None, description="Null: train with the values above.")

    def with_params(self, params: dict[str, float | str]) -> AlsConfig:
        """A copy with some hyperparameters replaced (integers kept integral)."""
        typed = {name: _typed(name, value) for name, value in params.items()}
        return self.model_validate(self.model_dump() | typed)

    def hyperparameters(self) -> dict[str, float | str]:
        return {
            "factors": self.factors,
            "regularization": self.regularization,
            "alpha": self.alpha,
            "iterations": self.iterations,
            "popularity_weight": self.popularity_weight,
            "weighting": self.weighting,
            "bm25_k1": self.bm25_k1,
            "bm25_idf_exponent": self.bm25_idf_exponent,
        }


class GateConfig(_Section):
    """Paired bootstrap tests on ndcg@k over the evaluated users, at ``evaluation.confidence``."""

    min_lift_over_baseline: float = Field(
        default=0.0, description="Candidate ndcg must exceed the popularity baseline's by more than this."
    )
    max_drop_vs_champion: float = Field(
        default=0.02, ge=0, description="Candidate ndcg may be at most this far below the champion's."
    )
    resamples: int = Field(default=2000, ge=100, description="Bootstrap resamples of the evaluated users.")


class EvaluationConfig(_Section):
    k: int = Field(default=10, ge=1)
    max_users: int = Field(
        default=20_000,
        ge=1,
        description="Holdout users scored (a seeded sample, the same for candidate, baseline and champion).",
    )
    min_users: int = Field(
        default=100,
        ge=1,
        description="A holdout with fewer users to evaluate fails the run before training.",
    )
    sample_seed: int = 0
    confidence: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="Level of the bootstrap intervals logged with every metric, and of the gate's tests.",
    )
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _sample_holds_min_users(self) -> EvaluationConfig:
        if self.max_users < self.min_users:
            raise ValueError(f"max_users ({self.max_users}) is below min_users ({self.min_users})")
        return self


class IndexConfig(_Section):
    backend: Literal["scann", "exact"] = "scann"
    metric: Literal["dot_product", "cosine"] = Field(
        default="dot_product",
        description="dot_product ranks as ALS scores; cosine ignores item popularity in norms.",
    )
    brute_force_below: int = Field(
        default=20_000, ge=0, description="Catalogue size under which search is exact."
    )
    num_leaves: int | None = Field(default=None, ge=2, description="Tree leaves; sqrt(items) if null.")
    leaves_to_search: int | None = Field(default=None, ge=1)
    reorder: int = Field(default=200, ge=1)
    recall_sample_users: int = Field(default=1000, ge=1)
    min_recall: float = Field(default=0.95, ge=0, le=1)
    max_p99_ms: float = Field(
        default=5.0, gt=0, description="One-query search latency budget (99th percentile, one thread)."
    )


class RecommendationsConfig(_Section):
    top_n: int = Field(default=50, ge=1, description="Precomputed list length per active user.")
    active_days: int = Field(default=30, ge=1, description="Users with events this recently are active.")


class ValidationConfig(_Section):
    min_density: float = Field(default=1e-7, ge=0, le=1)
    max_top_item_share: float = Field(
        default=0.2, gt=0, le=1, description="One item's share of interactions."
    )
    min_rec_coverage: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of the catalogue the batch lists cover (a floor for one's own catalogue).",
    )
    min_rec_coverage_over_popular: float = Field(
        default=1.5,
        ge=0,
        description=(
            "Distinct items the lists span over those the same users' most-popular lists span"
            " (where the catalogue leaves less room above those lists, half the room it leaves)."
        ),
    )
    max_rec_popular_share: float = Field(
        default=0.9, ge=0, le=1, description="Slots each user's most-popular list (unseen items) fills too."
    )
    row_count_band: float = Field(
        default=0.5, ge=0, description="Window events may differ from the champion run's count by this share."
    )
    max_collapsed_share: float = Field(default=0.01, ge=0, le=1)
    sample_rows: int = Field(
        default=200_000,
        ge=1,
        description="Row-level suites check a seeded sample this big.",
    )
    min_mean_norm: float = Field(default=1e-3, ge=0)
    max_mean_norm: float = Field(default=100.0, gt=0)


class DriftConfig(_Section):
    """Rotation-invariant drift against the champion; a run outside these bounds is not promoted."""

    k: int = Field(default=10, ge=1)
    sample_items: int = Field(default=2000, ge=1)
    sample_users: int = Field(default=1000, ge=1)
    min_neighbour_retention: float = Field(default=0.3, ge=0, le=1)
    min_neighbour_overlap: float = Field(default=0.0, ge=0, le=1)
    min_aligned_cosine: float = Field(default=0.3, ge=-1, le=1)
    min_rec_overlap: float = Field(default=0.1, ge=0, le=1)
    max_norm_ks: float = Field(default=0.5, ge=0, le=1)


class ErasureConfig(_Section):
    """How an erasure request (``recsys forget``) treats the registered versions that hold the user."""

    retain_versions: bool = Field(
        default=True,
        description="true: keep the old versions' records (tags, metrics) and delete their artifacts; "
        "false: delete the versions",
    )


class RefreshConfig(_Section):
    """The nightly fold-in, and when it must give way to a full retrain."""

    solver: Literal["cholesky", "cg"] = Field(
        default="cholesky",
        description="cholesky: exact per-user solve; cg: conjugate gradient, warm-started.",
    )
    cg_steps: int = Field(default=3, ge=1, description="CG iterations per vector when solver=cg.")
    max_new_item_share: float = Field(
        default=0.1, ge=0, le=1, description="New items above this share of the catalogue escalate."
    )
    max_parent_age_days: float = Field(
        default=8.0, gt=0, description="A weekly parent older than this (by data) escalates."
    )


def _without_credentials(value: str | None, field: str, where_instead: str) -> str | None:
    """Refuse a URI that carries credentials (user info, or a secret in its query): config is
    logged, snapshotted and published, so a secret in it would end up in logs, params and
    artifacts. The refusal names the field, never the value."""
    if value is not None and has_credentials(value):
        raise ValueError(f"{field} carries credentials: remove them and {where_instead}")
    return value


class SparkConfig(_Section):
    master: str = "local[*]"
    conn_id: str = Field(
        default="recsys_spark", description="Airflow connection the Spark tasks submit through."
    )
    pool: str = Field(
        default="recsys_spark",
        description="Airflow pool every Spark task of every recsys run takes a slot of (`recsys airflow db "
        "migrate` creates it with pool_slots).",
    )
    pool_slots: int = Field(
        default=1, ge=1, description="Spark jobs at once: 1 on one machine; more on a cluster."
    )
    broadcast_max_rows: int = Field(
        default=5_000_000,
        ge=0,
        description="An ID map joined by broadcast is held whole by the driver and every executor, and "
        "extended by the driver: up to this many rows; larger ones by Spark, joined by a shuffle.",
    )
    driver_max_events: int = Field(
        default=250_000_000,
        ge=0,
        description="A run's events (a night's, a week's, a first window) are aggregated into pairs "
        "by the driver when there are at most this many and the users' ID map is the driver's (within "
        "broadcast_max_rows); memory: a batch of 2M events read at a time (about 60 bytes each) and "
        "one user range's pairs, the other ranges waiting on local disk (24 bytes an event). More, by "
        "Spark, whose executors share the work on a cluster.",
    )
    small_input_max_events: int = Field(
        default=5_000_000,
        ge=0,
        description="A run's input of at most this many events (a night's, a week's) is handled by "
        "Arrow on the driver instead of Spark jobs: ingest's source records, when the source is "
        "Parquet that both read alike (recsys_pipeline.driver_ingest; about 300 bytes a record held "
        "at once), and the interactions' input fingerprint over the lake's new events. More, or other "
        "sources, by Spark.",
    )
    conf: dict[str, str] = Field(
        default={},
        description="Spark settings; one whose name is secret (spark.redaction.regex) is set by the job "
        "itself when it starts its session, never handed to Airflow, and recorded redacted.",
    )

    refresh_conf: dict[str, str] = Field(
        default={},
        description="Settings layered over conf for a refresh's Spark job (the nightly's): a night's job "
        "lasts seconds, where settings that suit a week's may cost more than they save.",
    )

    def job_conf(self, refresh: bool) -> dict[str, str]:
        """The settings of a Spark job: conf, with refresh_conf over it for a refresh's."""
        return {**self.conf, **self.refresh_conf} if refresh else dict(self.conf)

    def submit_conf(self, refresh: bool) -> dict[str, str]:
        """The settings a Spark task may carry in Airflow (rendered and stored there): none secret."""
        return {key: value for key, value in self.job_conf(refresh).items() if not is_secret_name(key)}

    @field_validator("master")
    @classmethod
    def _master_without_credentials(cls, value: str) -> str:
        return (
            _without_credentials(value, "spark.master", "put them in the Airflow connection spark.conn_id")
            or value
        )


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(default=None, description="Null: SQLite under the state folder.")
    experiment: str = "recsys-pipeline"
    model_name: str = "recsys-als"
    promote: bool = Field(
        default=True, description="False (a dry run): publish and gate the version, never move champion."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _tracking_uri_without_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(
            value,
            "mlflow.tracking_uri",
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) in the "
            "environment, which MLflow reads itself",
        )


class ContentSourceConfig(_Section):
    """Item metadata: one row per item, its columns named by role."""

    path: Path
    format: Literal["csv", "parquet"] = "csv"
    delimiter: str = ","
    header: bool = True
    encoding: str = Field(default="utf8", description="Text encoding of a CSV (e.g. latin1).")
    column_names: list[str] | None = Field(
        default=None, description="Names for a header-less CSV, in file order."
    )
    id_column: str
    text_columns: list[str] = []
    categorical_columns: list[str] = []
    numeric_columns: list[str] = []

    @model_validator(mode="after")
    def _some_feature(self) -> ContentSourceConfig:
        if not (self.text_columns or self.categorical_columns or self.numeric_columns):
            raise ValueError("name at least one text, categorical or numeric column")
        return self


class PrecomputedEncoderConfig(_Section):
    path: Path = Field(description="Parquet of item id -> vector produced elsewhere.")
    id_column: str = "item_id"
    vector_column: str = "vector"
    min_coverage: float = Field(
        default=0.9, ge=0, le=1, description="Share of metadata items that must have a vector."
    )


class SentenceEncoderConfig(_Section):
    model_dir: Path = Field(description="A sentence-transformers model saved locally; nothing is downloaded.")
    sha256: str = Field(description="Hash of the model folder (`recsys content-hash DIR` prints it).")
    batch_size: int = Field(default=256, ge=1)


class ContentMapConfig(_Section):
    """Ridge regression from content vectors to ALS item factors, fitted on warm items each full run."""

    alphas: list[float] = Field(default=[0.1, 1.0, 10.0, 100.0], min_length=1)
    validation_share: float = Field(default=0.2, gt=0, lt=1)
    min_r2: float = Field(default=0.0, description="A map fitting worse than this on held-out items fails.")
    seed: int = 0


class ContentConfig(_Section):
    """Content embeddings give items without enough interactions a vector in the collaborative space."""

    enabled: bool = False
    source: ContentSourceConfig | None = None
    encoder: Literal["builtin", "precomputed", "sentence"] = "builtin"
    dim: int = Field(default=64, ge=2, description="Content vector width (builtin and precomputed).")
    max_text_features: int = Field(default=20_000, ge=1, description="Builtin TF-IDF vocabulary size.")
    fit_sample: int = Field(
        default=200_000, ge=100, description="Items the builtin encoder is fitted on; all are transformed."
    )
    batch_items: int = Field(default=50_000, ge=1, description="Items encoded per batch.")
    precomputed: PrecomputedEncoderConfig | None = None
    sentence: SentenceEncoderConfig | None = None
    map: ContentMapConfig = ContentMapConfig()
    hybrid_half_count: float | None = Field(
        default=None,
        gt=0,
        description="Blend: an item with n interactions weighs its content vector by h/(h+n); null: off.",
    )
    max_quarantine_share: float = Field(default=0.05, ge=0, le=1)
    min_coverage: float = Field(
        default=0.5, ge=0, le=1, description="Share of the catalogue that must have a content vector."
    )

    @model_validator(mode="after")
    def _encoder_is_configured(self) -> ContentConfig:
        if not self.enabled:
            return self
        if self.source is None:
            raise ValueError("content.enabled needs content.source")
        if self.encoder == "precomputed" and self.precomputed is None:
            raise ValueError("content.encoder=precomputed needs content.precomputed")
        if self.encoder == "sentence" and self.sentence is None:
            raise ValueError("content.encoder=sentence needs content.sentence")
        return self


# What no DAG run may override, whatever the config allows: where state, input, models and servers are.
NEVER_RUN_OVERRIDABLE = (
    "state_dir",
    "source",
    "spark",
    "mlflow",
    "locks",
    "content.source",
    "content.precomputed",
    "content.sentence",
    "run_overrides_allowed",
)
DEFAULT_RUN_OVERRIDABLE = [
    "als",
    "interactions",
    "evaluation",
    "index",
    "recommendations",
    "validation",
    "drift",
    "refresh",
    "content.map",
    "content.hybrid_half_count",
]


def _overlaps(field: str, section: str) -> bool:
    """Whether one dotted field lies within the other (or is it)."""
    return field == section or field.startswith(f"{section}.") or section.startswith(f"{field}.")


class LocksConfig(_Section):
    """How runs, the CLI and services coordinate writes to what they share (the lake, the ID maps,
    alias moves)."""

    backend: Literal["flock", "postgres"] = Field(
        default="flock",
        description="flock: lock files in the state folder (one machine, or a file system whose locks "
        "reach every machine); postgres: advisory locks on the database at `dsn` (any number of machines).",
    )
    dsn: str | None = Field(
        default=None,
        description="postgres: a libpq connection string or URI, e.g. the Airflow metadata database's, "
        "without a password (PGPASSWORD or ~/.pgpass supply it).",
    )
    timeout_s: float = Field(
        default=4 * 3600.0,
        gt=0,
        description="A lock not free within this long fails the task, naming its holder.",
    )

    @field_validator("dsn")
    @classmethod
    def _dsn_without_credentials(cls, value: str | None) -> str | None:
        # A user name is fine (libpq needs one); a password in the URI's user info or as a keyword is not.
        if value is not None and re.search(r"://[^/@\s]*:[^/@\s]*@|password\s*=", value, re.IGNORECASE):
            raise ValueError(
                "locks.dsn holds a password: set PGPASSWORD or a ~/.pgpass entry in the environment "
                "instead, which libpq reads itself"
            )
        return value

    @model_validator(mode="after")
    def _postgres_has_a_dsn(self) -> LocksConfig:
        if self.backend == "postgres" and not self.dsn:
            raise ValueError("locks.backend postgres needs locks.dsn (the database to hold the locks)")
        return self


class RegistryConfig(_Section):
    """Where published versions are: the registry (MLflow) and the state folder that caches verified
    copies. All a service needs (:class:`~recsys_pipeline.client.RecsysClient`); the pipeline's
    configuration extends it."""

    state_dir: Path | None = Field(default=None, description="Null: $RECSYS_HOME, else ./var.")
    mlflow: MlflowConfig = MlflowConfig()
    locks: LocksConfig = LocksConfig()

    @field_validator("state_dir", mode="after")
    @classmethod
    def _absolute_state_dir(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

    @property
    def state_home(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        return Path(os.environ.get("RECSYS_HOME") or PROJECT_ROOT / "var").resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow.tracking_uri or f"sqlite:///{self.state_home / 'mlflow' / 'mlflow.db'}"


class PipelineConfig(RegistryConfig):
    source: SourceConfig
    events: EventsConfig = EventsConfig()
    interactions: InteractionsConfig
    als: AlsConfig = AlsConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    index: IndexConfig = IndexConfig()
    recommendations: RecommendationsConfig = RecommendationsConfig()
    validation: ValidationConfig = ValidationConfig()
    drift: DriftConfig = DriftConfig()
    refresh: RefreshConfig = RefreshConfig()
    erasure: ErasureConfig = ErasureConfig()
    content: ContentConfig = ContentConfig()
    spark: SparkConfig = SparkConfig()
    run_overrides_allowed: list[str] = Field(
        default=DEFAULT_RUN_OVERRIDABLE,
        description="Fields or sections a DAG run's config_overrides may set; never paths, URIs or "
        "model folders (NEVER_RUN_OVERRIDABLE).",
    )

    @field_validator("run_overrides_allowed")
    @classmethod
    def _never_paths_or_servers(cls, value: list[str]) -> list[str]:
        refused = sorted(
            {field for field in value for never in NEVER_RUN_OVERRIDABLE if _overlaps(field, never)}
        )
        if refused:
            raise ValueError(
                f"{', '.join(refused)} may not be overridden by a DAG run: paths, URIs and model folders "
                "come from the config file only"
            )
        return value

    def run_override_allowed(self, field: str) -> bool:
        return any(
            field == allowed or field.startswith(f"{allowed}.") for allowed in self.run_overrides_allowed
        )

    @model_validator(mode="after")
    def _every_event_type_has_a_weight(self) -> PipelineConfig:
        unweighted = sorted(set(self.events.event_types) - set(self.interactions.event_weights))
        if unweighted:
            raise ValueError(f"interactions.event_weights has no entry for event types {unweighted}")
        return self

    def as_record(self) -> dict[str, Any]:
        """The whole configuration as a run records and logs it: JSON-compatible values, secrets
        redacted (:mod:`~recsys_pipeline.redaction`)."""
        return cast(dict[str, Any], redact_tree(self.model_dump(mode="json")))

    def from_record(self, record: dict[str, Any]) -> PipelineConfig:
        """The configuration :meth:`as_record` recorded, its secrets taken from this (live) one."""
        return PipelineConfig.model_validate(restore_secrets(record, self.model_dump(mode="json")))

    def fingerprint(self) -> str:
        """sha256 of every setting that shapes a model (where state lives and which servers run it
        do not), so a run with another config is another version."""
        shaping = self.model_dump(mode="json", exclude={"state_dir", "spark", "mlflow", "locks"})
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def parse_override(assignment: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as YAML so numbers and lists keep their type."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    return key.strip(), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
            node = child
        node[leaf] = value
    return raw


def layered(base: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """``profile`` over ``base``: mappings merge key by key, anything else (a list, a value, null)
    replaces what the base says."""
    merged = dict(base)
    for key, value in profile.items():
        below = merged.get(key)
        merged[key] = layered(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


# libyaml's loader where PyYAML has it: it read the defaults in 0.9 ms against the pure-Python
# loader's 10.7 ms, and every task of a run reads the config again.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(path.read_text(), Loader=SAFE_LOADER) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} holds no mapping of sections")
    return cast(dict[str, Any], raw)


def load_config(path: Path | str | None = None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Read the defaults, layer the profile (``path``, else ``$RECSYS_CONFIG``, else the bundled
    sample's) and the overrides over them, and validate.

    Relative paths inside the files are resolved against the project root, so the
    same file works from any working directory.
    """
    config_path = Path(path or os.environ.get(CONFIG_ENV) or SAMPLE_PROFILE_PATH)
    raw = apply_overrides(layered(_read_yaml(DEFAULT_CONFIG_PATH), _read_yaml(config_path)), overrides or {})
    if "source" not in raw:
        raise ConfigError(
            f"{config_path} names no source: add a `source:` section saying where your events are and "
            f"how their columns map (docs/configuration.md; {SAMPLE_PROFILE_PATH.name} shows one)"
        )
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in issue['loc'])}: {issue['msg']}" for issue in error.errors()
        )
        raise ConfigError(f"invalid config {config_path}: {problems}") from None
    content = config.content
    for holder, name in (
        (config.source, "path"),
        (content.source, "path"),
        (content.precomputed, "path"),
        (content.sentence, "model_dir"),
        (config, "state_dir"),
    ):
        if holder is not None and getattr(holder, name) is not None:
            setattr(holder, name, Path(os.path.normpath(PROJECT_ROOT / getattr(holder, name))))
    return config
