"""The model registry: versions, aliases (``champion``, ``previous``), promotion, rollback, downloads
and the status report the CLI shows."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys_pipeline import tracking
from recsys_pipeline.bundle import MANIFEST_TAG, MODEL_MANIFEST, Bundle, BundleIntegrityError, verify_tree
from recsys_pipeline.config import AlsConfig, PipelineConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir
from recsys_pipeline.runs import RunContext
from recsys_pipeline.state import StateLayout

log = logging.getLogger(__name__)
CHAMPION, PREVIOUS = "champion", "previous"
# Tagged on a version that passed every gate but left the alias where it was (a dry run, or a week
# older than the champion's data).
WOULD_PROMOTE = "would_promote"
# What makes two runs the same version: the same DAG and window, input, resolved config and code.
IDENTITY_TAGS = ("run_key", "input_fingerprint", "config_hash", "code_version")


class GateFailedError(RecsysError):
    """A gate did not pass, so the champion alias was left where it was."""


class NothingPublishedError(RecsysError, LookupError):
    """The registry holds no version behind the requested alias."""


class RegistryUnavailableError(RecsysError):
    """The registry did not answer, or answered with an error other than "does not exist"."""


def is_absent(error: Exception) -> bool:
    """Whether a registry error says the thing asked for does not exist (and nothing else went wrong)."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(error)
    )


def find_version(config: PipelineConfig, tags: dict[str, str]) -> Any | None:
    """The newest version with the same identity (``IDENTITY_TAGS``: run, input, config and code), if any."""
    query = " and ".join(
        [f"name = '{config.mlflow.model_name}'", *(f"tags.{name} = '{tags[name]}'" for name in IDENTITY_TAGS)]
    )
    versions = tracking.client(config).search_model_versions(query)
    return max(versions, key=lambda v: int(v.version)) if versions else None


def alias_version(config: PipelineConfig, alias: str) -> Any | None:
    """The version behind ``alias``; None only when the registry says there is none.

    Any other registry error fails closed: a run that cannot see its champion must not skip the
    champion comparison, the drift check or the row-count band as if there were none.
    """
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client(config).get_model_version_by_alias(config.mlflow.model_name, alias)
    except MlflowException as error:
        if is_absent(error):
            return None
        raise RegistryUnavailableError(
            f"the model registry at {tracking.display_uri(config)} could not be read ({error.error_code}): "
            "check that it is running and reachable, then retry"
        ) from error


def wait_until_ready(config: PipelineConfig, version: str, timeout_s: float = 300) -> None:
    bound = tracking.client(config)
    name = config.mlflow.model_name
    deadline = time.monotonic() + timeout_s
    while (status := bound.get_model_version(name, version).status) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise GateFailedError(f"{name} version {version} is {status}, not READY: not promoted")
        time.sleep(1)


class ChampionMovedError(RecsysError):
    """The champion is no longer the version a run was judged against or derived from."""


ANY_CHAMPION = "any"  # what a person's `recsys promote` replaces: whatever is champion


def promote(
    config: PipelineConfig, version: str, reason: str, judged_against: str | None = ANY_CHAMPION
) -> None:
    """Point ``champion`` at ``version``; the version it replaces keeps ``previous``.

    A compare-and-set under the alias lock: with ``judged_against`` (the version the run was
    evaluated against or folded into, None for none), the alias moves only if the champion is still
    that version, or a nightly derived from it with data ending no later than ``version``'s (a
    weekly retrained on the same days replaces its own week's fold-in, whichever finished first).
    """
    bound = tracking.client(config)
    name = config.mlflow.model_name
    wait_until_ready(config, version)
    candidate = bound.get_model_version(name, version)
    with StateLayout(config.state_home).lock(name="aliases"):
        current = alias_version(config, CHAMPION)
        if current is not None and str(current.version) == str(version):
            return
        if judged_against != ANY_CHAMPION and not replaces(current, judged_against, candidate):
            raise ChampionMovedError(
                f"version {version} was judged against "
                f"{'no champion' if judged_against is None else f'version {judged_against}'}, but the "
                f"champion is now version {current.version if current is not None else 'none'}: not "
                "promoted (the next run is judged against the new champion)"
            )
        if current is not None:
            bound.set_registered_model_alias(name, PREVIOUS, current.version)
        bound.set_registered_model_alias(name, CHAMPION, version)
        bound.set_model_version_tag(name, version, "promotion_reason", reason)
    log.info("%s@%s -> version %s (%s)", name, CHAMPION, version, reason)


def replaces(current: Any | None, judged_against: str | None, candidate: Any) -> bool:
    """Whether ``candidate``, judged against ``judged_against``, may replace ``current``."""
    if current is None or judged_against is None:
        return current is None and judged_against is None
    if str(current.version) == judged_against:
        return True
    return (
        current.tags.get("kind") == "refresh"
        and current.tags.get("derived_from_version", current.tags.get("parent_version")) == judged_against
        and candidate.tags.get("kind") != "refresh"
        and data_end(current) <= data_end(candidate)
    )


def rollback(config: PipelineConfig, reason: str) -> str:
    """Make the ``previous`` version champion again (the replaced champion becomes ``previous``)."""
    with StateLayout(config.state_home).lock(name="aliases"):
        previous = alias_version(config, PREVIOUS)
    if previous is None:
        raise NothingPublishedError(f"no version of {config.mlflow.model_name} has the alias '{PREVIOUS}'")
    current = alias_version(config, CHAMPION)
    promote(
        config,
        str(previous.version),
        reason=f"rollback: {reason}",
        judged_against=None if current is None else str(current.version),
    )
    return str(previous.version)


def download(config: PipelineConfig, alias: str = CHAMPION) -> tuple[Any, Bundle]:
    """(model version, its bundle) behind ``alias``, cached per version under the state home."""
    version, model = alias_model(config, alias)
    return version, Bundle(model / "artifacts" / "bundle")


def alias_model(config: PipelineConfig, alias: str = CHAMPION) -> tuple[Any, Path]:
    """(model version, its verified local folder) behind ``alias`` (see :func:`verified_model`)."""
    version = alias_version(config, alias)
    if version is None:
        raise NothingPublishedError(
            f"no version of {config.mlflow.model_name} has the alias '{alias}' yet: run the weekly DAG first"
        )
    return version, verified_model(config, str(version.version))


def version_bundle(config: PipelineConfig, version: str) -> Bundle:
    """The bundle of one registered version, from a verified local copy (see :func:`verified_model`)."""
    return Bundle(verified_model(config, version) / "artifacts" / "bundle")


def verified_model(config: PipelineConfig, version: str) -> Path:
    """The local folder of one registered model version, every file checked before it is returned.

    The copy is cached under the state home and checked against the manifest whose sha256 the
    registry holds on every call, cache included. A copy that fails is downloaded again once; a
    second failure is refused: the stored model itself differs from what was published.
    """
    name = config.mlflow.model_name
    registered = tracking.client(config).get_model_version(name, version)
    expected = registered.tags.get(MANIFEST_TAG)
    if expected is None:
        raise BundleIntegrityError(
            f"{name} version {version} was published without a manifest (an older format): republish it"
        )
    cache = StateLayout(config.state_home).model_cache / name / version
    if (cache / MODEL_MANIFEST).is_file():
        try:
            verify_tree(cache / "model", cache / MODEL_MANIFEST, expected)
            return cache / "model"
        except BundleIntegrityError as error:
            log.warning(
                "cached %s version %s failed verification (%s): downloading again", name, version, error
            )
    # Downloaded and verified beside the cache, which it replaces only once verified: no reader ever
    # sees an unverified copy at the cache's path, and a failed download removes nothing in use.
    with atomic_dir(cache) as staging:
        _download(config, version, registered.run_id, staging)
        try:
            verify_tree(staging / "model", staging / MODEL_MANIFEST, expected)
        except BundleIntegrityError as error:
            raise BundleIntegrityError(
                f"{name} version {version} fails verification after a fresh download ({error}): "
                "the stored model differs from what was published; refusing to load it"
            ) from error
    return cache / "model"


def _download(config: PipelineConfig, version: str, run_id: str, staging: Path) -> None:
    import mlflow

    name = config.mlflow.model_name
    with tracking.fluent(config) as bound:
        staging.mkdir(parents=True)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}", dst_path=str(staging / "model")
        )
        bound.download_artifacts(run_id, MODEL_MANIFEST, str(staging))


def data_end(version: Any) -> datetime:
    return datetime.fromisoformat(version.tags["data_interval_end"])


def reference_version(config: PipelineConfig, run_data_end: datetime) -> Any | None:
    """The version a run whose data ends at ``run_data_end`` is judged against (evaluation, drift,
    row counts) and a nightly folds into: the champion of the run's own time. That is the newest, by
    data end, of the champion (unless its data ends later, for then it has trained on the run's
    holdout), versions once promoted (only when it does: a replay of history, whose champion of its
    own time is one of them) and, when the run is a dry run or replays history, versions that passed
    every gate without moving the alias (``would_promote``), so that a replay's later runs build on
    its earlier ones while a live run never builds on a dry run's version. Only versions whose data
    ends no later than the run's count. None when there is no such version."""
    champion = alias_version(config, CHAMPION)
    replaying_history = champion is not None and data_end(champion) > run_data_end
    counts_would_promote = replaying_history or not config.mlflow.promote
    candidates = [
        version
        for version in tracking.client(config).search_model_versions(f"name = '{config.mlflow.model_name}'")
        if data_end(version) <= run_data_end
        and (
            (counts_would_promote and version.tags.get(WOULD_PROMOTE) == "true")
            or (replaying_history and "promotion_reason" in version.tags)
        )
    ]
    if champion is not None and not replaying_history:
        candidates.append(champion)
    return max(candidates, key=lambda version: (data_end(version), int(version.version)), default=None)


def run_reference(run: RunContext) -> Any | None:
    """The run's :func:`reference_version`, as its first stage to ask found it (pinned in the run's
    folder: :meth:`~recsys_pipeline.runs.RunContext.pinned_reference`); None when there was none."""

    def look_up() -> str | None:
        version = reference_version(run.config, run.interval_end)
        return None if version is None else str(version.version)

    pinned = run.pinned_reference(look_up)
    if pinned is None:
        return None
    return tracking.client(run.config).get_model_version(run.config.mlflow.model_name, pinned)


def reference_bundle(run: RunContext) -> tuple[str, Bundle] | None:
    """(version, verified bundle) of :func:`run_reference`, to compare a candidate with; None if
    there is none."""
    version = run_reference(run)
    if version is None:
        return None
    return str(version.version), version_bundle(run.config, str(version.version))


def reference_params(run: RunContext) -> AlsConfig | None:
    """The ALS settings :func:`run_reference` was trained with (what a sweep starts from); None if
    there is no such version."""
    reference = reference_bundle(run)
    return None if reference is None else reference[1].trained_params(run.config.als)


def list_versions(config: PipelineConfig) -> list[dict[str, Any]]:
    """Every registered version, newest first, as ``{version, aliases, tags, metrics}``."""
    bound = tracking.client(config)
    name = config.mlflow.model_name
    # Version search results leave aliases out; the registered model holds them all.
    aliases = bound.get_registered_model(name).aliases
    rows = [
        {
            "version": int(version.version),
            "aliases": sorted(
                alias for alias, number in aliases.items() if str(number) == str(version.version)
            ),
            "tags": dict(sorted(version.tags.items())),
            "metrics": dict(sorted(bound.get_run(version.run_id).data.metrics.items())),
        }
        for version in bound.search_model_versions(f"name = '{name}'")
    ]
    return sorted(rows, key=lambda row: -row["version"])


def champion_status(config: PipelineConfig) -> dict[str, Any]:
    """What ``recsys status`` reports about the version behind ``champion``."""
    bound = tracking.client(config)
    name = config.mlflow.model_name
    version = alias_version(config, CHAMPION)
    if version is None:
        raise NothingPublishedError(f"no version of {name} is the champion: {why_no_champion(config)}")
    run = bound.get_run(version.run_id)
    tags = version.tags
    status = {
        "model": name,
        "version": int(version.version),
        "aliases": list(version.aliases),
        "run_id": version.run_id,
        "kind": tags.get("kind", "full"),
        "data_window": {"start": tags.get("data_interval_start"), "end": tags.get("data_interval_end")},
        "created_at": datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC).isoformat(),
        "metrics": dict(sorted(run.data.metrics.items())),
        "tags": dict(sorted(tags.items())),
        "stages": stage_costs(run.data.metrics),
    }
    if "cold_items" in run.data.metrics:
        metrics = run.data.metrics
        status["content"] = {
            "cold_items": int(metrics["cold_items"]),
            "map": {
                name: metrics[f"content_map_{name}"]
                for name in ("r2", "cosine", "alpha")
                if f"content_map_{name}" in metrics
            },
        }
    if status["kind"] == "refresh":
        status["refresh"] = {
            "parent_version": int(tags["parent_version"]),
            "derived_from_version": int(tags["derived_from_version"]),
            "day": tags["refresh_day"],
            "users_updated": int(tags["users_updated"]),
            "users_added": int(tags["users_added"]),
            "items_added": int(tags["items_added"]),
            "refresh_s": float(tags["refresh_s"]),
        }
    return status


def stage_costs(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """``{task: {seconds, peak_rss_mb}}`` from the ``stage_seconds_<task>`` and ``stage_peak_rss_mb_<task>``
    metrics each task recorded."""
    return {
        name.removeprefix("stage_seconds_"): {
            "seconds": value,
            "peak_rss_mb": metrics.get(f"stage_peak_rss_mb_{name.removeprefix('stage_seconds_')}", 0.0),
        }
        for name, value in sorted(metrics.items())
        if name.startswith("stage_seconds_")
    }


def why_no_champion(config: PipelineConfig) -> str:
    """What the state and the registry say about the latest attempt, for a user wondering why nothing
    is champion: a run that failed before publishing, a version whose gates failed, a rejected run."""
    bound = tracking.client(config)
    versions = bound.search_model_versions(f"name = '{config.mlflow.model_name}'")
    latest = max(versions, key=lambda v: int(v.version)) if versions else None
    failure_file = StateLayout(config.state_home).last_failure
    if failure_file.exists():
        failure = json.loads(failure_file.read_text())
        failed_at = datetime.fromisoformat(failure["failed_at"]).timestamp() * 1000
        if latest is None or failed_at > latest.creation_timestamp:
            return f"run {failure['run_key']} failed at {failure['task']}: {failure['message'][:1000]}"
    if latest is not None:
        failed = latest.tags.get("gates_failed")
        if failed:
            gates = [part.partition(": ") for part in failed.split(" | ")]
            described = "; and ".join(f"the {gate} gate: {reasons}" for gate, _, reasons in gates)
            return f"version {latest.version} failed {described}"
        return f"version {latest.version} is registered but was never promoted (recsys promote --version N)"
    experiment = bound.get_experiment_by_name(config.mlflow.experiment)
    if experiment is not None:
        rejected = bound.search_runs(
            [experiment.experiment_id],
            "tags.rejected != ''",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if rejected:
            tags = rejected[0].data.tags
            run_key = tags.get("run_key", rejected[0].info.run_id)
            return f"run {run_key} failed validation: {tags['rejected'][:500]}"
    return "nothing has been published yet: run the weekly DAG (make run)"


def version_status(config: PipelineConfig, version: str) -> dict[str, Any]:
    """Tags and run metrics of one registered version."""
    bound = tracking.client(config)
    model_version = bound.get_model_version(config.mlflow.model_name, version)
    return {
        "version": int(model_version.version),
        "tags": dict(model_version.tags),
        "metrics": dict(bound.get_run(model_version.run_id).data.metrics),
    }
