"""Bad requests get a clear, short refusal: in process, from the CLI and over REST (issue #14, item 10)."""

from __future__ import annotations

import http.client
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from recsys_pipeline.bundle import write_bundle
from recsys_pipeline.cli import main
from recsys_pipeline.serving import (
    MAX_BATCH_ROWS,
    MAX_BODY_BYTES,
    MAX_K,
    BadRequestError,
    Recommender,
    RecsysPyfunc,
)
from recsys_pipeline.stages.publish import run_promotion, run_publish, run_tags
from tests.conftest import free_port, start, stop


@pytest.fixture
def recommender_and_model(own_weekly_run) -> tuple[Recommender, RecsysPyfunc]:
    bundle = write_bundle(own_weekly_run, {"tags": run_tags(own_weekly_run)})
    model = RecsysPyfunc()
    model.load_context(SimpleNamespace(artifacts={"bundle": str(bundle)}))
    return Recommender.from_path(bundle), model


@pytest.mark.parametrize("k", [-1, 0, MAX_K + 1, 2.5, "3", 10**400, float("inf")])
def test_k_outside_one_to_the_maximum_is_refused(recommender_and_model, k) -> None:
    recommender, _ = recommender_and_model
    user = recommender.user_ids[0]
    with pytest.raises(BadRequestError, match=f"k must be a whole number from 1 to {MAX_K}"):
        recommender.recommend(user, k)
    with pytest.raises(BadRequestError, match="k must be a whole number"):
        recommender.similar(recommender.item_ids[recommender.has_item_vector.argmax()], k)


def test_a_batch_with_bad_rows_is_refused_naming_each_row(recommender_and_model) -> None:
    recommender, model = recommender_and_model
    rows = pd.DataFrame(
        [
            {"user_id": recommender.user_ids[0], "item_id": None, "k": 5},
            {"user_id": None, "item_id": None, "k": 5},
            {"user_id": None, "item_id": "no-such-item", "k": 5},
            {"user_id": recommender.user_ids[1], "item_id": None, "k": -1},
        ]
    )
    with pytest.raises(MlflowException) as refused:
        model.predict(None, rows)
    message = refused.value.message
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert "row 0" not in message
    assert "row 1: each row needs a user_id or an item_id" in message
    assert "row 2: unknown item id 'no-such-item'" in message
    assert "row 3: k must be a whole number" in message
    too_many = pd.DataFrame({"user_id": [recommender.user_ids[0]] * (MAX_BATCH_ROWS + 1)})
    with pytest.raises(MlflowException, match=f"send at most {MAX_BATCH_ROWS}"):
        model.predict(None, too_many)
    answered = model.predict(None, rows.iloc[[0]])
    assert answered["rank"].tolist() == [1, 2, 3, 4, 5]


def test_the_cli_refuses_a_negative_k_in_one_line(own_weekly_run, capsys) -> None:
    run_promotion(own_weekly_run, run_publish(own_weekly_run))
    state = ["--set", f"state_dir={own_weekly_run.config.state_home}"]
    user, item = (
        own_weekly_run.artifacts.interactions.ids("users")[0],
        own_weekly_run.artifacts.interactions.ids("items")[0],
    )
    for command in (["recommend", "--user-id", user], ["similar", "--item-id", item]):
        capsys.readouterr()
        assert main([*state, *command, "-k", "-1", "--json"]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("recsys: k must be a whole number from 1 to")
    # A session from the command line: recent item ids, of a known user or of nobody known.
    recent = ",".join(own_weekly_run.artifacts.interactions.ids("items")[:3])
    for who in ([], ["--user-id", user]):
        capsys.readouterr()
        assert main([*state, "recommend", "--recent-item-ids", recent, *who, "-k", "4", "--json"]) == 0
        answer = json.loads(capsys.readouterr().out)
        assert len(answer) == 4 and not {row["item_id"] for row in answer} & set(recent.split(","))
    assert main([*state, "recommend", "-k", "4"]) == 1
    assert "recommend needs --user-id, --recent-item-ids or both" in capsys.readouterr().err


def send_unfinished(port: int, headers: dict[str, str], parts: list[bytes]) -> tuple[int, str]:
    """POST the headers and the parts of a body that never ends, then read the answer."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.putrequest("POST", "/invocations")
    for name, value in {"Content-Type": "application/json", **headers}.items():
        connection.putheader(name, value)
    connection.endheaders()
    for part in parts:
        connection.send(part)
    response = connection.getresponse()
    return response.status, response.read().decode()


@pytest.mark.e2e
def test_rest_answers_400_with_a_short_reason_per_bad_row(own_weekly_run, tmp_path: Path) -> None:
    run_promotion(own_weekly_run, run_publish(own_weekly_run))
    port = free_port()
    recsys = str(Path(sys.executable).parent / "recsys")
    state = ["--set", f"state_dir={own_weekly_run.config.state_home}"]
    server = start(
        [recsys, *state, "serve", "--port", str(port)],
        dict(os.environ),
        f"http://127.0.0.1:{port}/ping",
        tmp_path / "serve.log",
    )
    user = str(own_weekly_run.artifacts.interactions.ids("users")[0])

    def post(records: list[dict]) -> tuple[int, str]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"dataframe_records": records}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    try:
        for records, reason in (
            ([{}], "each row needs a user_id or an item_id"),
            ([{"user_id": user, "k": -1}], "k must be a whole number"),
            ([{"user_id": user, "k": 2.5}], "k must be a whole number"),
            ([{"user_id": user, "k": 3}, {"item_id": "no-such-item", "k": 3}], "row 1: unknown item id"),
        ):
            status, body = post(records)
            assert status == 400, (records, status, body)
            message = json.loads(body)["message"]
            assert reason in message
            assert "Traceback" not in body and "stack_trace" not in body and "site-packages" not in body
        # A body too large to be a request is refused before MLflow parses it: when its declared
        # length is too large, before any of it is sent; when chunked, once what came is too much.
        chunk = b"x" * (MAX_BODY_BYTES // 2 + 1)
        for headers, parts in (
            ({"Content-Length": str(100 * MAX_BODY_BYTES)}, []),
            ({"Transfer-Encoding": "chunked"}, [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 2),
        ):
            status, answer = send_unfinished(port, headers, parts)
            assert status == 413 and "send at most 1000 rows" in json.loads(answer)["message"]
        status, body = post([{"user_id": user, "k": 3}])
        assert status == 200 and len(json.loads(body)["predictions"]) == 3
    finally:
        stop(server)
