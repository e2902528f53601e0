"""The declared pipelines are well formed: every stage's function resolves and takes what the
runners hand it, every artifact a stage reads is written before it (or comes from outside the
run), names are unique, and each DAG's order is one its dependencies allow."""

from __future__ import annotations

import inspect

import pytest

from recsys_pipeline.config import PROJECT_ROOT, load_config
from recsys_pipeline.pipelines import PIPELINES, WEEKLY, Pipeline, Stage, stage_table

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("pipeline", PIPELINES.values(), ids=lambda p: p.dag_id)
def test_every_stage_resolves_and_reads_only_what_was_written_before(pipeline: Pipeline) -> None:
    names = [stage.name for stage in pipeline.stages]
    assert len(names) == len(set(names))
    assert pipeline.unwritten_reads() == []
    for stage in pipeline.stages:
        parameters = list(inspect.signature(stage.callable()).parameters)
        assert parameters[:1] == ["run"] or parameters[:2] == ["spark", "run"], stage.name
        handed = [artifact for artifact in stage.reads if any(s.returns == artifact for s in pipeline.stages)]
        assert len(parameters) >= 1 + len(handed), stage.name
        # Upstream stages come earlier: the declared order is a topological order of the DAG.
        for upstream in pipeline.upstream(stage.name):
            assert names.index(upstream) < names.index(stage.name)
    assert {stage.name for stage in pipeline.stages if stage.updates_champion} == {"promote"}


@pytest.mark.parametrize("pipeline", PIPELINES.values(), ids=lambda p: p.dag_id)
def test_every_stage_but_the_first_runs_after_some_other(pipeline: Pipeline) -> None:
    starts = [stage.name for stage in pipeline.stages if not pipeline.upstream(stage.name)]
    assert starts and all(stage.reads for stage in pipeline.stages)
    assert set(starts) <= {"ingest_events", "ingest_items"}


def test_a_read_nothing_wrote_is_found() -> None:
    broken = Pipeline("broken", "full", (Stage("a", "train:run_training", reads=("nothing_writes_this",)),))
    assert broken.unwritten_reads() == [("a", "nothing_writes_this")]


def test_spark_runs_only_the_stages_that_need_it() -> None:
    implicit, spark = load_config(), load_config(overrides={"als.backend": "spark"})
    # ingest_items needs no Spark, but runs inside the Spark job it joins rather than in a task between
    # two Spark start-ups.
    assert {name: [s.name for s in stages] for name, stages in WEEKLY.spark_jobs(implicit).items()} == {
        "ingest_and_build_interactions": ["ingest_events", "ingest_items", "build_interactions"],
    }
    assert "train" in WEEKLY.spark_jobs(spark)
    joining = Pipeline("joining", "full", (Stage("a", "train:run_training", spark_job="job"),))
    assert joining.spark_jobs(implicit) == {}, "a job with no Spark stage is no Spark application"
    nightly = PIPELINES["recsys_nightly"].spark_jobs(implicit)
    assert [stage.name for stage in nightly["ingest_and_build_interactions"]] == [
        "ingest_events",
        "build_interactions",
    ]


@pytest.mark.parametrize("pipeline", PIPELINES.values(), ids=lambda p: p.dag_id)
def test_the_developers_guide_shows_the_stages_as_declared(pipeline: Pipeline) -> None:
    guide = (PROJECT_ROOT / "docs" / "development.md").read_text()
    assert stage_table(pipeline, load_config()) in guide
