"""What a person triggering a DAG run may ask for: the typed params of the trigger form, and
``config_overrides`` for any other field the configuration's allowlist opens to a run."""

from __future__ import annotations

from typing import Any

from recsys_pipeline.config import ConfigError, PipelineConfig

# The knobs a person changes by hand when triggering a run, each a typed field of the trigger form
# (param name: (config field, JSON schema of the form field, help)). ``config_overrides`` carries
# any other field, and wins over these.
TRIGGER_PARAMS: dict[str, tuple[str, dict[str, Any], str]] = {
    "als_backend": ("als.backend", {"type": "string", "enum": ["implicit", "spark"]}, "ALS implementation"),
    "als_factors": ("als.factors", {"type": "integer", "minimum": 1, "maximum": 1024}, "Vector width"),
    "sweep": (
        "als.sweep",
        {"type": "boolean"},
        "Search the weighting, regularization, alpha and the popularity weight first",
    ),
    "holdout_strategy": (
        "interactions.holdout.strategy",
        {"type": "string", "enum": ["per_user_last", "days", "share"]},
        "What the evaluation holds out",
    ),
    "full_reingest": ("events.incremental", {"type": "boolean"}, "Re-read the whole source"),
    "dry_run": ("mlflow.promote", {"type": "boolean"}, "Publish and gate, never move champion"),
}


def trigger_defaults(config: PipelineConfig) -> dict[str, Any]:
    """Each trigger param's value that leaves ``config`` as it is."""
    return {
        "als_backend": config.als.backend,
        "als_factors": config.als.factors,
        "sweep": config.als.sweep is not None,
        "holdout_strategy": config.interactions.holdout.strategy,
        "full_reingest": not config.events.incremental,
        "dry_run": not config.mlflow.promote,
    }


def run_overrides(params: dict[str, Any], config: PipelineConfig) -> dict[str, Any]:
    """The dotted overrides a run's params ask for: the typed trigger params that differ from
    ``config``, then ``config_overrides`` over them."""
    defaults = trigger_defaults(config)
    overrides: dict[str, Any] = {}
    for name, (field, _, _) in TRIGGER_PARAMS.items():
        if name not in params or params[name] == defaults[name]:
            continue
        value = params[name]
        if name == "sweep":
            value = {} if value else None  # on: the sweep's defaults
        elif name in ("full_reingest", "dry_run"):
            value = not value
        overrides[field] = value
    asked = dict(params.get("config_overrides") or {})
    refused = sorted(
        field for dotted, value in asked.items() for field in _refused_fields(config, dotted, value)
    )
    if refused:
        raise ConfigError(
            f"config_overrides may not set {', '.join(refused)}: a DAG run may override only "
            f"run_overrides_allowed ({', '.join(config.run_overrides_allowed)}); set the rest in the "
            "config file"
        )
    return overrides | asked


def _refused_fields(config: PipelineConfig, dotted: str, value: Any) -> list[str]:
    """The fields an override outside the allowlist would set (a nested section is followed down)."""
    if config.run_override_allowed(dotted):
        return []
    if isinstance(value, dict) and value:
        return [
            field
            for key, child in value.items()
            for field in _refused_fields(config, f"{dotted}.{key}", child)
        ]
    return [dotted]
