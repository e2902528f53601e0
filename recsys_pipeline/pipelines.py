"""Each DAG's stages, declared once, as data.

A :class:`Stage` names one step (its name is the task id, the stage function's metrics prefix and
the name in every log), the function it calls, what it reads and writes, and whether it needs a
Spark session. A :class:`Pipeline` is the stages of one DAG in the order they run; each stage
runs after the latest earlier stage writing something it reads. The DAG files
(:func:`recsys_pipeline.orchestration.wire`), the in-process runner (:func:`run_in_process`,
used by tests, benchmarks and ``recsys replay``) and the Spark entry point (``jobs/run_stages.py``)
all come from these declarations; ``tests/test_pipelines.py`` checks them without running any.

Stage functions are named as ``module:function`` under ``recsys_pipeline.stages`` and imported
when called: DAG files are parsed often, and the stages import Spark and NumPy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from typing import TYPE_CHECKING, Any

from recsys_pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from recsys_pipeline.runs import RunContext, RunMode

STAGES_PACKAGE = "recsys_pipeline.stages"


def never(config: PipelineConfig) -> bool:
    return False


def always(config: PipelineConfig) -> bool:
    return True


def spark_backend(config: PipelineConfig) -> bool:
    return config.als.backend == "spark"


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function" under recsys_pipeline.stages
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    # Whether the stage takes a Spark session (and so runs under spark-submit): by the config.
    uses_spark: Callable[[PipelineConfig], bool] = never
    # Stages with the same job run in one Spark application, in their declared order (one task named
    # by the job). A stage that takes no Spark session may join a job to run between its Spark stages.
    spark_job: str | None = None
    # A branch: when the function returns True the DAG triggers this DAG instead of going on.
    escalates_to: str | None = None
    # The function's return value is this artifact (handed to readers, e.g. the published version).
    returns: str | None = None
    updates_champion: bool = False
    # Publishing finds the version a run already registered, and promotion follows it: both may run
    # for a published run, which every other stage refuses (its files are what the version holds).
    runs_on_published: bool = False

    def callable(self) -> Callable[..., Any]:
        module, _, function = self.function.partition(":")
        stage: Callable[..., Any] = getattr(import_module(f"{STAGES_PACKAGE}.{module}"), function)
        return stage

    def job(self) -> str:
        return self.spark_job or self.name

    @property
    def outputs(self) -> tuple[str, ...]:
        return (*self.writes, self.returns) if self.returns else self.writes


# What a run reads from outside itself: the sources and the champion version.
EXTERNAL = frozenset({"source", "item_source", "champion"})


@dataclass(frozen=True)
class Pipeline:
    dag_id: str
    mode: RunMode
    stages: tuple[Stage, ...]
    external: frozenset[str] = field(default=EXTERNAL)

    def stage(self, name: str) -> Stage:
        (found,) = [stage for stage in self.stages if stage.name == name]
        return found

    def upstream(self, name: str) -> list[str]:
        """The stages ``name`` runs after: for each artifact it reads, the latest earlier writer."""
        position = [stage.name for stage in self.stages].index(name)
        found: list[str] = []
        for artifact in self.stage(name).reads:
            writers = [stage.name for stage in self.stages[:position] if artifact in stage.outputs]
            if writers and writers[-1] not in found:
                found.append(writers[-1])
        return found

    def unwritten_reads(self) -> list[tuple[str, str]]:
        """(stage, artifact) pairs read before any stage writes them and not from outside the run."""
        written: set[str] = set(self.external)
        missing = []
        for stage in self.stages:
            missing += [(stage.name, artifact) for artifact in stage.reads if artifact not in written]
            written |= set(stage.outputs)
        return missing

    def job_of(self, stage: Stage, config: PipelineConfig) -> str | None:
        """The Spark application ``stage`` runs in under ``config``, or None (a task of its own): a
        stage without Spark runs in the job it joins only while that job has a Spark stage."""
        if stage.uses_spark(config):
            return stage.job()
        joined = stage.spark_job
        if joined is not None and any(
            other.spark_job == joined and other.uses_spark(config) for other in self.stages
        ):
            return joined
        return None

    def spark_jobs(self, config: PipelineConfig) -> dict[str, list[Stage]]:
        """The Spark applications the pipeline submits under ``config``: job name -> its stages."""
        jobs: dict[str, list[Stage]] = {}
        for stage in self.stages:
            job = self.job_of(stage, config)
            if job is not None:
                jobs.setdefault(job, []).append(stage)
        return jobs


# The artifacts stages hand each other (each a fixed place of the run's folder or the shared state).
LAKE = "lake"
ITEMS = "items"
INTERACTIONS = "interactions"
EMBEDDINGS = "embeddings"
EVALUATION = "evaluation"
INDEX = "index"
RECOMMENDATIONS = "recommendations"
VALIDATION = "validation"
REFRESH = "refresh_record"
GO_ON = "refresh_not_escalated"
VERSION = "version"


def _ingest_and_interactions(*between: Stage, spark_job: str | None = None) -> tuple[Stage, ...]:
    """ingest_events, any stages ``between``, then build_interactions: every DAG starts so."""
    return (
        Stage(
            "ingest_events",
            "ingest:run_ingest",
            reads=("source",),
            writes=(LAKE,),
            uses_spark=always,
            spark_job=spark_job,
        ),
        *between,
        Stage(
            "build_interactions",
            "interactions:run_interactions",
            # The items: with content on, the item metadata's ids join the catalogue.
            reads=(LAKE, ITEMS),
            writes=(INTERACTIONS,),
            uses_spark=always,
            spark_job=spark_job,
        ),
    )


def _publish_tail(recommend_reads: tuple[str, ...], publish_reads: tuple[str, ...]) -> tuple[Stage, ...]:
    """batch_recommend, validate, publish and promote: every DAG ends so."""
    return (
        Stage(
            "batch_recommend",
            "recommend:run_batch_recommendations",
            reads=(*recommend_reads, LAKE, INTERACTIONS, EMBEDDINGS, INDEX),
            writes=(RECOMMENDATIONS,),
        ),
        Stage(
            "validate",
            "validate:run_validation",
            reads=(LAKE, INTERACTIONS, EMBEDDINGS, RECOMMENDATIONS),
            writes=(VALIDATION,),
        ),
        Stage(
            "publish",
            "publish:run_publish",
            reads=(EMBEDDINGS, INDEX, RECOMMENDATIONS, VALIDATION, *publish_reads),
            returns=VERSION,
            runs_on_published=True,
        ),
        Stage(
            "promote",
            "publish:run_promotion",
            reads=(VERSION,),
            updates_champion=True,
            runs_on_published=True,
        ),
    )


INGEST_JOB = "ingest_and_build_interactions"

WEEKLY = Pipeline(
    "recsys_weekly",
    "full",
    (
        *_ingest_and_interactions(
            # After the events: it checks the metadata names enough of their items before training,
            # and the interactions' catalogue takes in the items it describes. It needs no Spark, but
            # running inside the events' application spares a second Spark start-up after it.
            Stage(
                "ingest_items",
                "content:run_item_ingest",
                reads=("item_source", LAKE),
                writes=(ITEMS,),
                spark_job=INGEST_JOB,
            ),
            spark_job=INGEST_JOB,
        ),
        Stage(
            "train",
            "train:run_training",
            reads=(INTERACTIONS,),
            writes=(EMBEDDINGS,),
            uses_spark=spark_backend,
        ),
        # Items without a learned vector get one from their metadata: the served embeddings.
        Stage("content", "content:run_content", reads=(EMBEDDINGS, ITEMS), writes=(EMBEDDINGS,)),
        Stage(
            "evaluate",
            "evaluate:run_evaluation",
            reads=(INTERACTIONS, EMBEDDINGS, "champion"),
            writes=(EVALUATION,),
        ),
        Stage("build_index", "index:run_index", reads=(EMBEDDINGS,), writes=(INDEX,)),
        *_publish_tail((), (EVALUATION,)),
    ),
)

NIGHTLY = Pipeline(
    "recsys_nightly",
    "refresh",
    (
        # One Spark application for both: a second start-up would cost more than a night's work.
        *_ingest_and_interactions(spark_job=INGEST_JOB),
        Stage(
            "fold_in",
            "refresh:run_refresh",
            reads=(INTERACTIONS, "champion"),
            writes=(EMBEDDINGS, REFRESH),
        ),
        Stage(
            "escalate_or_continue",
            "refresh:refresh_escalated",
            reads=(REFRESH,),
            writes=(GO_ON,),
            escalates_to="recsys_weekly",
        ),
        Stage(
            "update_index",
            "index:run_index_refresh",
            reads=(GO_ON, EMBEDDINGS, REFRESH),
            writes=(INDEX,),
        ),
        *_publish_tail((GO_ON, REFRESH), (REFRESH,)),
    ),
    # A night's catalogue takes in the item metadata the last weekly took in.
    external=EXTERNAL | {ITEMS},
)

PIPELINES = {pipeline.dag_id: pipeline for pipeline in (WEEKLY, NIGHTLY)}


def stage_table(pipeline: Pipeline, config: PipelineConfig) -> str:
    """The pipeline's stages as a Markdown table (docs/development.md holds it; a test keeps the two
    equal): name, function, what it reads and writes, the stages it runs after, Spark or not."""
    rows = [
        "| stage | function | reads | writes | runs after | Spark |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for stage in pipeline.stages:
        cells = (
            f"`{stage.name}`",
            f"`{stage.function}`",
            ", ".join(stage.reads),
            ", ".join(stage.outputs),
            ", ".join(pipeline.upstream(stage.name)),
            _spark_cell(pipeline, stage, config),
        )
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


@dataclass(frozen=True)
class InProcessResult:
    """What :func:`run_in_process` did: the stages it ran, and the published version if it got there."""

    ran: tuple[str, ...]
    escalated: bool = False
    version: str | None = None


def run_in_process(
    pipeline: Pipeline,
    run: RunContext,
    spark: SparkSession | None = None,
    until: str | None = None,
) -> InProcessResult:
    """Run the pipeline's stages in order in this process, as its DAG would (Spark stages on
    ``spark``, or on a session started for them), stopping after ``until`` or where a branch
    escalates."""
    from recsys_pipeline.spark import spark_session

    session = spark
    results: dict[str, Any] = {}
    ran: list[str] = []
    try:
        for stage in pipeline.stages:
            arguments = [results[artifact] for artifact in stage.reads if artifact in results]
            if stage.uses_spark(run.config):
                if session is None:
                    session = spark_session(
                        run.config,
                        f"recsys-{pipeline.dag_id}",
                        run.config.spark.master,
                        refresh=run.mode == "refresh",
                    )
                outcome = stage.callable()(spark=session, run=run)
            else:
                outcome = stage.callable()(run, *arguments)
            ran.append(stage.name)
            if stage.returns:
                results[stage.returns] = outcome
            if stage.escalates_to and outcome:
                return InProcessResult(tuple(ran), escalated=True)
            if stage.name == until:
                break
    finally:
        if spark is None and session is not None:
            session.stop()
    return InProcessResult(tuple(ran), version=results.get(VERSION))


def _spark_cell(pipeline: Pipeline, stage: Stage, config: PipelineConfig) -> str:
    job = pipeline.job_of(stage, config)
    if job is None:
        return "no"
    return f"yes ({job})" if stage.uses_spark(config) else f"no, in {job}"
