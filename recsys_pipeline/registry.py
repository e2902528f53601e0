"""The model registry: versions, aliases (``champion``, ``previous``), promotion, rollback, downloads
and the status report the CLI shows."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, cast

from recsys_pipeline import tracking
from recsys_pipeline.artifacts import RefreshLineage
from recsys_pipeline.bundle import MANIFEST_TAG, MODEL_MANIFEST, Bundle, BundleIntegrityError, verify_tree
from recsys_pipeline.config import RegistryConfig
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.files import atomic_dir
from recsys_pipeline.runs import RunContext
from recsys_pipeline.state import StateLayout

log = logging.getLogger(__name__)
CHAMPION, PREVIOUS = "champion", "previous"
ANY_CHAMPION = "any"  # what a person's `recsys promote` replaces: whatever is champion


class VersionMark(StrEnum):
    """What the pipeline records on a version after registering it: its gates and its promotion."""

    MANIFEST = MANIFEST_TAG  # the sha256 of the model's manifest, which every load is checked against
    GATES_PASSED = "gates_passed"
    GATES_FAILED = "gates_failed"  # each failed gate with its reasons
    # Passed every gate but left the alias where it was (a dry run, or a week older than the champion's data).
    WOULD_PROMOTE = "would_promote"
    PROMOTION_REASON = "promotion_reason"  # set whenever the version became champion


# A version is a weekly's (full), a nightly's (refresh), or a copy of one without the users an
# erasure request named (erasure).
VersionKind = Literal["full", "refresh", "erasure"]
# What an erasure version records beside its parent's tags.
ERASURE_OF, ERASURE_REQUEST = "erasure_of", "erasure_request"

# What makes two runs the same version: the same DAG and window, input, resolved config and code.
IDENTITY_TAGS = ("run_key", "input_fingerprint", "config_hash", "code_version")


@dataclass(frozen=True)
class VersionTags:
    """What a run's MLflow run and its registered version say of it, one tag per field: its identity,
    window, input, code and (for a nightly) lineage. Written by publish, read wherever a version is
    judged, compared or shown."""

    dag_id: str
    airflow_run_id: str
    run_key: str
    data_interval_start: datetime
    data_interval_end: datetime
    source: str
    input_fingerprint: str
    config_hash: str
    code_version: str
    backend: str
    bundle_format: str
    kind: VersionKind
    lineage: RefreshLineage | None = None  # a nightly's (and its erasure copy's)

    def as_tags(self) -> dict[str, str]:
        tags = {field.name: getattr(self, field.name) for field in fields(self) if field.name != "lineage"}
        tags["data_interval_start"] = self.data_interval_start.isoformat()
        tags["data_interval_end"] = self.data_interval_end.isoformat()
        return {**tags, **(self.lineage.tags() if self.lineage is not None else {})}

    def identity(self) -> dict[str, str]:
        return {name: getattr(self, name) for name in IDENTITY_TAGS}

    @classmethod
    def of(cls, version: Any) -> VersionTags:
        """The record of a registered version (anything with ``tags``, as MLflow returns it)."""
        tags: dict[str, str] = dict(version.tags)
        missing = [field.name for field in fields(cls) if field.name != "lineage" and field.name not in tags]
        if missing:
            raise RecsysError(
                f"version {getattr(version, 'version', '?')} lacks the tags {', '.join(missing)}: it was "
                "not published by this pipeline"
            )
        kind = cast(VersionKind, tags["kind"] if tags["kind"] in ("refresh", "erasure") else "full")
        return cls(
            dag_id=tags["dag_id"],
            airflow_run_id=tags["airflow_run_id"],
            run_key=tags["run_key"],
            data_interval_start=datetime.fromisoformat(tags["data_interval_start"]),
            data_interval_end=datetime.fromisoformat(tags["data_interval_end"]),
            source=tags["source"],
            input_fingerprint=tags["input_fingerprint"],
            config_hash=tags["config_hash"],
            code_version=tags["code_version"],
            backend=tags["backend"],
            bundle_format=tags["bundle_format"],
            kind=kind,
            lineage=RefreshLineage.from_tags(tags) if "refresh_day" in tags else None,
        )


class GateFailedError(RecsysError):
    """A gate did not pass, so the champion alias was left where it was."""


class NothingPublishedError(RecsysError, LookupError):
    """The registry holds no version behind the requested alias."""


class RegistryUnavailableError(RecsysError):
    """The registry did not answer, or answered with an error other than "does not exist"."""


class ChampionMovedError(RecsysError):
    """The champion is no longer the version a run was judged against or derived from."""


def is_absent(error: Exception) -> bool:
    """Whether a registry error says the thing asked for does not exist (and nothing else went wrong)."""
    code = getattr(error, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "not found" in str(error)
    )


class Registry:
    """The model registry of one configuration, through one MLflow client: a run, a CLI command or a
    service builds it once and asks it everything."""

    def __init__(self, config: RegistryConfig):
        self.config = config
        self.client = tracking.client(config)

    def find_version(self, tags: VersionTags) -> Any | None:
        """The newest version with the same identity (``IDENTITY_TAGS``: run, input, config and code),
        if any."""
        query = " and ".join(
            [
                f"name = '{self.config.mlflow.model_name}'",
                *(f"tags.{name} = '{value}'" for name, value in tags.identity().items()),
            ]
        )
        versions = self.client.search_model_versions(query)
        return max(versions, key=lambda v: int(v.version)) if versions else None

    def alias_version(self, alias: str) -> Any | None:
        """The version behind ``alias``; None only when the registry says there is none.

        Any other registry error fails closed: a run that cannot see its champion must not skip the
        champion comparison, the drift check or the row-count band as if there were none.
        """
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.config.mlflow.model_name, alias)
        except MlflowException as error:
            if is_absent(error):
                return None
            raise RegistryUnavailableError(
                f"the model registry at {tracking.display_uri(self.config)} could not be read "
                f"({error.error_code}): check that it is running and reachable, then retry"
            ) from error

    def version(self, version: str) -> Any:
        return self.client.get_model_version(self.config.mlflow.model_name, version)

    def mark(self, version: str, mark: VersionMark, value: str) -> None:
        self.client.set_model_version_tag(self.config.mlflow.model_name, version, mark, value)

    def wait_until_ready(self, version: str, timeout_s: float = 300) -> None:
        name = self.config.mlflow.model_name
        deadline = time.monotonic() + timeout_s
        while (status := self.version(version).status) != "READY":
            if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise GateFailedError(f"{name} version {version} is {status}, not READY: not promoted")
            time.sleep(1)

    def promote(self, version: str, reason: str, judged_against: str | None = ANY_CHAMPION) -> None:
        """Point ``champion`` at ``version``; the version it replaces keeps ``previous``.

        A compare-and-set under the alias lock: with ``judged_against`` (the version the run was
        evaluated against or folded into, None for none), the alias moves only if the champion is still
        that version, or a nightly derived from it with data ending no later than ``version``'s (a
        weekly retrained on the same days replaces its own week's fold-in, whichever finished first).
        """
        bound = self.client
        name = self.config.mlflow.model_name
        self.wait_until_ready(version)
        candidate = bound.get_model_version(name, version)
        with StateLayout.of(self.config).lock(name="aliases"):
            current = self.alias_version(CHAMPION)
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
            self.mark(version, VersionMark.PROMOTION_REASON, reason)
        log.info("%s@%s -> version %s (%s)", name, CHAMPION, version, reason)

    def rollback(self, reason: str) -> str:
        """Make the ``previous`` version champion again (the replaced champion becomes ``previous``)."""
        with StateLayout.of(self.config).lock(name="aliases"):
            previous = self.alias_version(PREVIOUS)
        if previous is None:
            raise NothingPublishedError(
                f"no version of {self.config.mlflow.model_name} has the alias '{PREVIOUS}'"
            )
        current = self.alias_version(CHAMPION)
        self.promote(
            str(previous.version),
            reason=f"rollback: {reason}",
            judged_against=None if current is None else str(current.version),
        )
        return str(previous.version)

    def erasure_copy(self, parent: str, request_id: str) -> Any | None:
        """The version an erasure request republished ``parent`` as, if it did."""
        query = (
            f"name = '{self.config.mlflow.model_name}' and tags.{ERASURE_OF} = '{parent}' "
            f"and tags.{ERASURE_REQUEST} = '{request_id}'"
        )
        versions = self.client.search_model_versions(query)
        return max(versions, key=lambda v: int(v.version)) if versions else None

    def all_versions(self) -> list[Any]:
        return list(self.client.search_model_versions(f"name = '{self.config.mlflow.model_name}'"))

    def point_previous(self, version: str | None) -> None:
        """Point ``previous`` at ``version`` (None: remove the alias), under the alias lock."""
        name = self.config.mlflow.model_name
        with StateLayout.of(self.config).lock(name="aliases"):
            if version is None:
                if self.alias_version(PREVIOUS) is not None:
                    self.client.delete_registered_model_alias(name, PREVIOUS)
            else:
                self.client.set_registered_model_alias(name, PREVIOUS, version)

    def delete_run_artifacts(self, run_id: str) -> None:
        """Delete every artifact of an MLflow run from the store (the run's record stays)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        with tracking.fluent(self.config) as bound:
            get_artifact_repository(bound.get_run(run_id).info.artifact_uri).delete_artifacts()

    def delete_version(self, version: str) -> None:
        self.client.delete_model_version(self.config.mlflow.model_name, version)

    def download(self, alias: str = CHAMPION) -> tuple[Any, Bundle]:
        """(model version, its bundle) behind ``alias``, cached per version under the state home."""
        version, model = self.alias_model(alias)
        return version, Bundle(model / "artifacts" / "bundle")

    def alias_model(self, alias: str = CHAMPION) -> tuple[Any, Path]:
        """(model version, its verified local folder) behind ``alias`` (see :func:`verified_model`)."""
        version = self.alias_version(alias)
        if version is None:
            raise NothingPublishedError(
                f"no version of {self.config.mlflow.model_name} has the alias '{alias}' yet: run the "
                "weekly DAG first"
            )
        return version, self.verified_model(str(version.version))

    def version_bundle(self, version: str) -> Bundle:
        """The bundle of one registered version, from a verified local copy (see :func:`verified_model`)."""
        return Bundle(self.verified_model(version) / "artifacts" / "bundle")

    def verified_model(self, version: str) -> Path:
        """The local folder of one registered model version, every file checked before it is returned.

        The copy is cached under the state home and checked against the manifest whose sha256 the
        registry holds on every call, cache included. A copy that fails is downloaded again once; a
        second failure is refused: the stored model itself differs from what was published.
        """
        name = self.config.mlflow.model_name
        registered = self.client.get_model_version(name, version)
        expected = registered.tags.get(MANIFEST_TAG)
        if expected is None:
            raise BundleIntegrityError(
                f"{name} version {version} was published without a manifest (an older format): republish it"
            )
        cache = StateLayout.of(self.config).model_cache / name / version
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
            self._download(version, registered.run_id, staging)
            try:
                verify_tree(staging / "model", staging / MODEL_MANIFEST, expected)
            except BundleIntegrityError as error:
                raise BundleIntegrityError(
                    f"{name} version {version} fails verification after a fresh download ({error}): "
                    "the stored model differs from what was published; refusing to load it"
                ) from error
        return cache / "model"

    def keep_verified(self, version: str, model: Path, manifest: bytes) -> None:
        """Take ``model``, a copy of one registered version already checked against its ``manifest``
        (as publishing checks what it uploaded), as this version's local copy: moved, not copied.
        Every load still verifies it (:meth:`verified_model`)."""
        cache = StateLayout.of(self.config).model_cache / self.config.mlflow.model_name / version
        with atomic_dir(cache) as staging:
            staging.mkdir(parents=True)
            shutil.move(model, staging / "model")
            (staging / MODEL_MANIFEST).write_bytes(manifest)

    def _download(self, version: str, run_id: str, staging: Path) -> None:
        import mlflow

        name = self.config.mlflow.model_name
        with tracking.fluent(self.config) as bound:
            staging.mkdir(parents=True)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(staging / "model")
            )
            bound.download_artifacts(run_id, MODEL_MANIFEST, str(staging))

    def reference_version(self, run_data_end: datetime) -> Any | None:
        """The version a run whose data ends at ``run_data_end`` is judged against (evaluation, drift,
        row counts) and a nightly folds into: the champion of the run's own time. That is the newest, by
        data end, of the champion (unless its data ends later, for then it has trained on the run's
        holdout), versions once promoted (only when it does: a replay of history, whose champion of its
        own time is one of them) and, when the run is a dry run or replays history, versions that passed
        every gate without moving the alias (``would_promote``), so that a replay's later runs build on
        its earlier ones while a live run never builds on a dry run's version. Only versions whose data
        ends no later than the run's count. None when there is no such version."""
        champion = self.alias_version(CHAMPION)
        replaying_history = champion is not None and data_end(champion) > run_data_end
        counts_would_promote = replaying_history or not self.config.mlflow.promote
        candidates = [
            version
            for version in self.client.search_model_versions(f"name = '{self.config.mlflow.model_name}'")
            if data_end(version) <= run_data_end
            and (
                (counts_would_promote and version.tags.get(VersionMark.WOULD_PROMOTE) == "true")
                or (replaying_history and VersionMark.PROMOTION_REASON in version.tags)
            )
        ]
        if champion is not None and not replaying_history:
            candidates.append(champion)
        return max(candidates, key=lambda version: (data_end(version), int(version.version)), default=None)

    def run_reference(self, run: RunContext) -> Any | None:
        """The run's :func:`reference_version`, as its first stage to ask found it (pinned in the run's
        folder: :meth:`~recsys_pipeline.runs.RunContext.pinned_reference`); None when there was none."""

        def look_up() -> str | None:
            version = self.reference_version(run.interval_end)
            return None if version is None else str(version.version)

        pinned = run.pinned_reference(look_up)
        if pinned is None:
            return None
        return self.client.get_model_version(run.config.mlflow.model_name, pinned)

    def reference_bundle(self, run: RunContext) -> tuple[str, Bundle] | None:
        """(version, verified bundle) of :func:`run_reference`, to compare a candidate with; None if
        there is none."""
        version = self.run_reference(run)
        if version is None:
            return None
        return str(version.version), self.version_bundle(str(version.version))

    def list_versions(self) -> list[dict[str, Any]]:
        """Every registered version, newest first, as ``{version, aliases, tags, metrics}``."""
        bound = self.client
        name = self.config.mlflow.model_name
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

    def champion_status(self) -> dict[str, Any]:
        """What ``recsys status`` reports about the version behind ``champion``."""
        bound = self.client
        name = self.config.mlflow.model_name
        version = self.alias_version(CHAMPION)
        if version is None:
            raise NothingPublishedError(f"no version of {name} is the champion: {self.why_no_champion()}")
        run = bound.get_run(version.run_id)
        tags = VersionTags.of(version)
        status = {
            "model": name,
            "version": int(version.version),
            "aliases": list(version.aliases),
            "run_id": version.run_id,
            "kind": tags.kind,
            "data_window": {
                "start": tags.data_interval_start.isoformat(),
                "end": tags.data_interval_end.isoformat(),
            },
            "created_at": datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC).isoformat(),
            "metrics": dict(sorted(run.data.metrics.items())),
            "tags": dict(sorted(version.tags.items())),
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
        if tags.kind == "erasure":
            status["erasure"] = {
                "copy_of_version": int(version.tags[ERASURE_OF]),
                "request_id": version.tags[ERASURE_REQUEST],
            }
        if tags.lineage is not None:
            lineage = tags.lineage
            status["refresh"] = {
                "parent_version": int(lineage.parent_version),
                "derived_from_version": int(lineage.derived_from_version),
                "day": lineage.refresh_day,
                "users_updated": lineage.users_updated,
                "users_added": lineage.users_added,
                "items_added": lineage.items_added,
                "refresh_s": lineage.refresh_s,
            }
        return status

    def why_no_champion(self) -> str:
        """What the state and the registry say about the latest attempt, for a user wondering why nothing
        is champion: a run that failed before publishing, a version whose gates failed, a rejected run."""
        bound = self.client
        versions = bound.search_model_versions(f"name = '{self.config.mlflow.model_name}'")
        latest = max(versions, key=lambda v: int(v.version)) if versions else None
        failure_file = StateLayout.of(self.config).last_failure
        if failure_file.exists():
            failure = json.loads(failure_file.read_text())
            failed_at = datetime.fromisoformat(failure["failed_at"]).timestamp() * 1000
            if latest is None or failed_at > latest.creation_timestamp:
                return f"run {failure['run_key']} failed at {failure['task']}: {failure['message'][:1000]}"
        if latest is not None:
            failed = latest.tags.get(VersionMark.GATES_FAILED)
            if failed:
                gates = [part.partition(": ") for part in failed.split(" | ")]
                described = "; and ".join(f"the {gate} gate: {reasons}" for gate, _, reasons in gates)
                return f"version {latest.version} failed {described}"
            return (
                f"version {latest.version} is registered but was never promoted (recsys promote --version N)"
            )
        experiment = bound.get_experiment_by_name(self.config.mlflow.experiment)
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

    def version_status(self, version: str) -> dict[str, Any]:
        """Tags and run metrics of one registered version."""
        bound = self.client
        model_version = bound.get_model_version(self.config.mlflow.model_name, version)
        return {
            "version": int(model_version.version),
            "tags": dict(model_version.tags),
            "metrics": dict(bound.get_run(model_version.run_id).data.metrics),
        }


def replaces(current: Any | None, judged_against: str | None, candidate: Any) -> bool:
    """Whether ``candidate``, judged against ``judged_against``, may replace ``current``."""
    if current is None or judged_against is None:
        return current is None and judged_against is None
    if str(current.version) == judged_against:
        return True
    replaced, replacing = VersionTags.of(current), VersionTags.of(candidate)
    return (
        replaced.lineage is not None
        and replaced.lineage.derived_from_version == judged_against
        and replacing.kind != "refresh"
        and replaced.data_interval_end <= replacing.data_interval_end
    )


def data_end(version: Any) -> datetime:
    return VersionTags.of(version).data_interval_end


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
