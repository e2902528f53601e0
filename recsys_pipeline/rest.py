"""``recsys serve``: the REST server a service calls, on MLflow's scoring-server contract.

``POST /invocations`` takes ``{"dataframe_records": [...]}``, ``{"dataframe_split": {"columns",
"data"}}`` or ``{"inputs"|"instances": rows or columns}``, each row a ``user_id``, an ``item_id`` or
``recent_item_ids`` (a session) with an optional ``k``, and answers ``{"predictions": [{"user_id" or
"query_item_id", "rank", "item_id", "score"}, ...]}``, as ``mlflow models serve`` does for the
registered pyfunc. A bad request gets 400 with ``{"error_code", "message"}`` naming each bad row; a
body over :data:`~recsys_pipeline.serving.MAX_BODY_BYTES` gets 413 before it is parsed.
``GET /ping`` and ``/health`` answer 200 once a version is loaded; ``/version`` names it; ``POST
/refresh`` checks the alias at once (what a DAG scheduled on the champion's Asset calls), answering
the version serving, with 503 and the reason when a new one failed verification.

The answers come from a :class:`~recsys_pipeline.client.RecsysClient`: the version is verified before
it is served and followed live (a new champion is swapped in without a restart). A request costs its
index search and a small JSON document: no DataFrame, nothing proportional to the catalogue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from recsys_pipeline.client import RecsysClient
from recsys_pipeline.config import CONFIG_ENV, load_config
from recsys_pipeline.errors import RecsysError
from recsys_pipeline.serving import MAX_BATCH_ROWS, BodySizeLimit, answer_row

log = logging.getLogger(__name__)
JSON_HEADERS = [(b"content-type", b"application/json")]
# What a worker process started by uvicorn reads to build its app (see ``serve``).
ALIAS_ENV, OVERRIDES_ENV, WATCH_ENV = "RECSYS_SERVE_ALIAS", "RECSYS_SERVE_OVERRIDES", "RECSYS_SERVE_WATCH_S"


class BadPayloadError(RecsysError):
    """A request body that is not one of the contract's shapes."""


def request_rows(payload: Any) -> list[dict[str, Any]]:
    """The rows of a request in any of the scoring server's JSON shapes."""
    if not isinstance(payload, dict):
        raise BadPayloadError('the body must be a JSON object such as {"dataframe_records": [...]}')
    if "dataframe_records" in payload:
        rows = payload["dataframe_records"]
    elif "dataframe_split" in payload:
        split = payload["dataframe_split"]
        if not isinstance(split, dict) or not isinstance(split.get("data"), list):
            raise BadPayloadError("dataframe_split must hold columns and data")
        columns = split.get("columns") or []
        rows = [dict(zip(columns, values, strict=False)) for values in split["data"]]
    else:
        key = next((name for name in ("inputs", "instances") if name in payload), None)
        if key is None:
            raise BadPayloadError(
                "the body must hold dataframe_records, dataframe_split, inputs or instances"
            )
        rows = payload[key]
        if isinstance(rows, dict):  # columns: {"user_id": [...], "k": [...]}
            length = max((len(v) for v in rows.values() if isinstance(v, list)), default=0)
            rows = [
                {name: v[i] if isinstance(v, list) else v for name, v in rows.items()} for i in range(length)
            ]
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise BadPayloadError("the rows must be a list of objects")
    if not rows:
        raise BadPayloadError("the request has no usable rows: each row needs a user_id or an item_id")
    if len(rows) > MAX_BATCH_ROWS:
        raise BadPayloadError(f"{len(rows)} rows in one request: send at most {MAX_BATCH_ROWS}")
    return rows


class InvocationsApp:
    """The ASGI app: the contract above, answered from ``client``."""

    def __init__(self, client: RecsysClient):
        self.client = client

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path in ("/ping", "/health"):
            await respond(send, 200, b"\n", [(b"content-type", b"text/plain")])
        elif method == "GET" and path == "/version":
            await respond(send, 200, json.dumps({"version": self.client.version}).encode())
        elif method == "POST" and path == "/refresh":
            # A consumer of the champion's Airflow Asset calls this so a new version is checked now,
            # not at the next poll; the version is verified before it is served, as at every check.
            await read_body(receive)
            await asyncio.to_thread(self.client.refresh)
            error = self.client.last_error
            await respond(
                send,
                200 if error is None else 503,
                json.dumps(
                    {"version": self.client.version, "error": None if error is None else str(error)}
                ).encode(),
            )
        elif method == "POST" and path == "/invocations":
            status, body = self.invocations(await read_body(receive))
            await respond(send, status, body)
        else:
            await respond(send, 404, error_body("ENDPOINT_NOT_FOUND", f"no endpoint {method} {path}"))

    def invocations(self, body: bytes) -> tuple[int, bytes]:
        try:
            rows = request_rows(json.loads(body))
        except (ValueError, RecsysError) as error:  # a JSONDecodeError is a ValueError
            return 400, error_body("BAD_REQUEST", str(error))
        # One version answers the whole request, even if a swap happens meanwhile.
        recommender = self.client.loaded().recommender
        predictions: list[dict[str, Any]] = []
        problems = []
        for number, row in enumerate(rows):
            try:
                key, value, items, scores = answer_row(recommender, row, self.client.session_weight)
            except RecsysError as error:
                problems.append(f"row {number}: {error}")
                continue
            ids = recommender.item_ids[items].tolist()
            predictions.extend(
                {key: value, "rank": rank, "item_id": item, "score": score}
                for rank, (item, score) in enumerate(zip(ids, scores.tolist(), strict=True), start=1)
            )
        if problems:
            return 400, error_body("INVALID_PARAMETER_VALUE", "; ".join(problems))
        return 200, json.dumps({"predictions": predictions}).encode()

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


async def read_body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


async def respond(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = JSON_HEADERS
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def create_app() -> Any:
    """The server's app in a worker process: the version behind the alias the environment names,
    verified, followed every ``RECSYS_SERVE_WATCH_S`` seconds, behind the body-size limit."""
    overrides = json.loads(os.environ.get(OVERRIDES_ENV) or "{}")
    client = RecsysClient(load_config(overrides=overrides), alias=os.environ.get(ALIAS_ENV, "champion"))
    watch_s = float(os.environ.get(WATCH_ENV) or 0)
    if watch_s > 0:
        client.watch(watch_s)
    log.info("serving version %s", client.version)
    return BodySizeLimit(InvocationsApp(client))


def serve(
    host: str,
    port: int,
    alias: str,
    config_path: Path | None,
    overrides: dict[str, Any],
    workers: int = 1,
    watch_s: float = 60.0,
) -> None:
    """Run the server until the process stops: ``workers`` processes sharing the port, each with the
    version loaded once. The configuration reaches them as this process loaded it: the file and the
    overrides, through the environment."""
    import uvicorn

    os.environ.update({ALIAS_ENV: alias, OVERRIDES_ENV: json.dumps(overrides), WATCH_ENV: str(watch_s)})
    if config_path is not None:
        os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
    uvicorn.run(
        "recsys_pipeline.rest:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
        access_log=False,
        http="auto",
        loop="auto",
    )
