"""Promotion is a compare-and-set: the default schedule cannot promote the wrong model (issue #31, 6).

The race: the nightly for the day ending Monday 00:00 starts while last week's weekly is champion and
folds into it; this week's weekly, judged against the same champion, ends on the same instant.
Whichever finishes first, this week's weekly is champion at the end.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta

import pytest

from recsys_pipeline import registry, tracking
from recsys_pipeline.artifacts import RefreshLineage
from recsys_pipeline.registry import Registry, VersionTags
from recsys_pipeline.runs import RunContext


def register(config, tmp_path, name: str, data_end: str, derived_from: str | None = None) -> str:
    """A model version with the tags a weekly run (or, ``derived_from`` a version, a nightly) gives it;
    its files do not matter to promotion."""
    end = datetime.fromisoformat(data_end)
    lineage = None
    if derived_from is not None:
        lineage = RefreshLineage(derived_from, derived_from, end.date().isoformat(), 1, 0, 0, 0.1)
    tags = VersionTags(
        dag_id="recsys_nightly" if lineage else "recsys_weekly",
        airflow_run_id=f"manual__{name}",
        run_key=name,
        data_interval_start=end - timedelta(days=1 if lineage else 7),
        data_interval_end=end,
        source="test",
        input_fingerprint=name,
        config_hash="config",
        code_version="code",
        backend="implicit",
        bundle_format="3",
        kind="refresh" if lineage else "full",
        lineage=lineage,
    )
    client = tracking.client(config)
    model = config.mlflow.model_name
    if not client.search_registered_models(f"name = '{model}'"):
        client.create_registered_model(model)
    source = tmp_path / name
    source.mkdir()
    (source / "MLmodel").write_text("flavors: {}\n")
    return str(client.create_model_version(model, str(source), tags=tags.as_tags()).version)


@pytest.fixture
def week(make_config, tmp_path):
    config = make_config()
    last_week = register(config, tmp_path, "w1", "1998-04-16T00:00:00+00:00")
    Registry(config).promote(last_week, "first weekly", judged_against=None)
    nightly = register(config, tmp_path, "n", "1998-04-23T00:00:00+00:00", derived_from=last_week)
    weekly = register(config, tmp_path, "w2", "1998-04-23T00:00:00+00:00")
    return config, last_week, nightly, weekly


def champion(config) -> str:
    return str(Registry(config).alias_version(registry.CHAMPION).version)


def test_the_nightly_finishing_after_the_weekly_does_not_replace_it(week) -> None:
    config, last_week, nightly, weekly = week
    Registry(config).promote(weekly, "weekly gates passed", judged_against=last_week)
    with pytest.raises(registry.ChampionMovedError, match=f"judged against version {last_week}"):
        Registry(config).promote(nightly, "nightly gates passed", judged_against=last_week)
    assert champion(config) == weekly


def test_the_weekly_finishing_after_the_nightly_replaces_its_own_weeks_fold_in(week) -> None:
    config, last_week, nightly, weekly = week
    Registry(config).promote(nightly, "nightly gates passed", judged_against=last_week)
    Registry(config).promote(weekly, "weekly gates passed", judged_against=last_week)
    assert champion(config) == weekly


def test_a_run_judged_against_a_champion_since_replaced_is_not_promoted(week, tmp_path) -> None:
    config, last_week, _, weekly = week
    Registry(config).promote(weekly, "weekly gates passed", judged_against=last_week)
    late = register(config, tmp_path, "late", "1998-04-23T00:00:00+00:00")
    with pytest.raises(registry.ChampionMovedError):
        Registry(config).promote(late, "a re-run judged against last week", judged_against=last_week)
    with pytest.raises(registry.ChampionMovedError, match="judged against no champion"):
        Registry(config).promote(late, "a first run", judged_against=None)
    # A person's promote replaces whatever is champion; a rollback goes back under the same lock.
    Registry(config).promote(late, "by hand")
    assert champion(config) == late
    assert Registry(config).rollback("bad numbers") == weekly and champion(config) == weekly


def test_a_run_is_judged_against_one_version_however_the_champion_moves_meanwhile(week) -> None:
    """The version a run is judged against is looked up once, by its first stage to ask, and pinned:
    evaluate, validate and the fold-in never see two champions (issue #30, 5)."""
    config, last_week, nightly, _ = week
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "scheduled__1998-04-16")
    assert str(Registry(run.config).run_reference(run).version) == last_week
    Registry(config).promote(nightly, "nightly gates passed", judged_against=last_week)
    assert str(Registry(run.config).run_reference(run).version) == last_week
    # A run that starts now is judged against the new champion; so is one in a folder copied from
    # the first (the record is kept per run id).
    rerun = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "manual__rerun")
    assert str(Registry(rerun.config).run_reference(rerun).version) == nightly
    shutil.copytree(run.run_dir, rerun.run_dir, dirs_exist_ok=True)
    assert str(Registry(rerun.config).run_reference(rerun).version) == nightly
