"""``python -m benchmarks``: which runs it accepts (the benchmarks themselves run by ``make bench``)."""

import pytest

from benchmarks.__main__ import main

pytestmark = pytest.mark.unit


def test_a_one_off_param_replaces_a_param_of_the_one_benchmark_named(capsys) -> None:
    assert main(["pipeline", "eventz=100000000"]) == 1
    assert main(["als", "pipeline", "events=100000000"]) == 1
    assert main(["events=100000000"]) == 1
    errors = capsys.readouterr().err
    assert errors.count("KEY=VALUE replaces params of one named benchmark") == 3
    assert main(["nonesuch"]) == 1
    assert "unknown benchmark(s) ['nonesuch']" in capsys.readouterr().err
