"""What counts as a secret, one rule for everything the pipeline writes: config snapshots, MLflow
params and tags, lineage files, error messages, alerts and Airflow fields.

A setting is secret when its name matches Spark's own default ``spark.redaction.regex`` (so Spark's
event logs and UI hide the same settings); a URI's credentials are its user info and any query
parameter whose name matches it. Redacted values read as Spark writes them.
"""

from __future__ import annotations

import re
from typing import Any

from recsys_pipeline.errors import RecsysError

SECRET_NAME = re.compile(r"(?i)secret|password|token|access[.]?key")
REDACTED = "*********(redacted)"

_USER_INFO = re.compile(r"(://)[^/@\s?#'\"]*@")
_NAME_CHARS = r"[\w.\-]*"
_SECRET_QUERY = re.compile(
    rf"([?&]{_NAME_CHARS}(?:secret|password|token|access[.]?key){_NAME_CHARS}=)[^&\s#'\"]*", re.IGNORECASE
)
_SECRET_ASSIGNMENT = re.compile(
    rf"((?<![\w.\-?&]){_NAME_CHARS}(?:secret|password|token|access[.]?key){_NAME_CHARS}['\"]?\s*[=:]\s*['\"]?)"
    r"(?!\*)[^\s'\",}&]+",
    re.IGNORECASE,
)


def is_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a user's credentials (user info or a secret query parameter)."""
    return redact_text(uri) != uri


def without_user_info(uri: str) -> str:
    return _USER_INFO.sub(r"\1", uri)


def redact_text(text: str) -> str:
    """``text`` with every URI's credentials and every ``secret-name=value`` replaced."""
    text = _USER_INFO.sub(rf"\1{REDACTED}@", text)
    text = _SECRET_QUERY.sub(rf"\1{REDACTED}", text)
    return _SECRET_ASSIGNMENT.sub(rf"\1{REDACTED}", text)


def redact_tree(value: Any) -> Any:
    """A JSON-like value with every secret-named entry's value and every string's credentials redacted."""
    if isinstance(value, dict):
        return {
            key: REDACTED if is_secret_name(str(key)) and entry is not None else redact_tree(entry)
            for key, entry in value.items()
        }
    if isinstance(value, list):
        return [redact_tree(entry) for entry in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


class MissingSecretError(RecsysError, ValueError):
    """A recorded configuration needs a secret that the live configuration does not hold."""


def restore_secrets(redacted: Any, live: Any, where: str = "") -> Any:
    """``redacted`` with each value :func:`redact_tree` hid taken from ``live`` (the configuration as
    loaded now), so a record can be written without secrets and still be used; a secret ``live``
    no longer has is refused by name."""
    if isinstance(redacted, dict):
        live_dict = live if isinstance(live, dict) else {}
        return {
            key: restore_secrets(entry, live_dict.get(key), f"{where}.{key}" if where else str(key))
            for key, entry in redacted.items()
        }
    if isinstance(redacted, list):
        live_list = live if isinstance(live, list) else []
        return [
            restore_secrets(entry, live_list[n] if n < len(live_list) else None, f"{where}[{n}]")
            for n, entry in enumerate(redacted)
        ]
    if isinstance(redacted, str) and REDACTED in redacted:
        matches = isinstance(live, str) and (redacted == REDACTED or redact_text(live) == redacted)
        if not matches:
            raise MissingSecretError(
                f"{where} was recorded without its secret and the configuration no longer has it: "
                "restore it (the environment or the config file) and re-run"
            )
        return live
    return redacted
