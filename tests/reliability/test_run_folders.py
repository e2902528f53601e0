"""Run folders are contained in their parent and distinct for every run id Airflow accepts
(issue #31, 5)."""

from __future__ import annotations

import re

from recsys_pipeline.runs import RunContext, run_slug

# Airflow's run_id pattern: letters, digits and these (``.`` alone or ``..`` included).
IDS = [
    "..",
    ".",
    "...",
    "a:b",
    "a-b",
    "a_b",
    "a/b",
    "a~3Ab",
    "a%3Ab",
    "manual__2026-01-01T00:00:00+00:00",
    "x" * 250,
]


def test_every_run_id_gets_its_own_folder_name_inside_its_parent() -> None:
    slugs = [run_slug(run_id) for run_id in IDS]
    assert len(set(slugs)) == len(IDS)
    for slug in slugs:
        assert slug not in (".", "..") and "/" not in slug and 0 < len(slug.encode()) <= 255
    assert run_slug("x" * 250) != run_slug("x" * 249 + "y")


def test_a_dot_dot_run_id_cannot_reach_every_runs_quarantine(make_config) -> None:
    config = make_config()
    run = RunContext.create(config, "recsys_weekly", "1998-04-16", "1998-04-23", "..")
    window = config.state_home / "lake" / "quarantine" / run.interval_key
    assert run.quarantine_dir.parent == run.layout.quarantine / run.interval_key
    assert (
        run.quarantine_dir.resolve().is_relative_to(window.resolve())
        and run.quarantine_dir.resolve() != window.resolve()
    )
    assert run.run_dir.resolve().parent == run.window_dir.resolve()
    assert re.fullmatch(r"[0-9A-Za-z._+~-]+", run.run_slug)
