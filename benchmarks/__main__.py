"""Run every benchmark, or one: ``python -m benchmarks [NAME [KEY=VALUE ...]]``; each writes
``var/bench/NAME.json``. ``KEY=VALUE`` (a YAML value) replaces one of NAME's params for a one-off run,
which writes ``var/bench/NAME-KEY=VALUE.json`` instead (the 100M-event pipeline run:
``python -m benchmarks pipeline events=100000000 users=2500000 items=500000``)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import yaml

from benchmarks import (
    als,
    cold_start,
    forget,
    index_search,
    interactions,
    pipeline,
    quality,
    refresh,
    serving,
    session,
)
from recsys_pipeline.config import load_config
from recsys_pipeline.files import write_json
from recsys_pipeline.state import StateLayout

BLAS_SETTINGS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS")
Benchmark = tuple[dict[str, Any], Callable[[dict[str, Any]], dict[str, Any]]]
BENCHMARKS: dict[str, Benchmark] = {
    "als": (als.PARAMS, als.run),
    "cold_start": (cold_start.PARAMS, cold_start.run),
    "forget": (forget.PARAMS, forget.run),
    "index": (index_search.PARAMS, index_search.run),
    "interactions": (interactions.PARAMS, interactions.run),
    "pipeline": (pipeline.PARAMS, pipeline.run),
    "quality": (quality.PARAMS, quality.run),
    "quality_ml100k": (quality.PARAMS, quality.run_bundled),
    "quality_synthetic": (quality.SYNTHETIC_PARAMS, quality.run_synthetic),
    "refresh": (refresh.PARAMS, refresh.run),
    "serving": (serving.PARAMS, serving.run),
    "session": (session.PARAMS, session.run),
}


def main(argv: list[str]) -> int:
    names = [arg for arg in argv if "=" not in arg] or sorted(BENCHMARKS)
    replaced = dict(arg.split("=", 1) for arg in argv if "=" in arg)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; available: {sorted(BENCHMARKS)}", file=sys.stderr)
        return 1
    if replaced and (len(names) != 1 or not set(replaced) <= set(BENCHMARKS[names[0]][0])):
        print(f"KEY=VALUE replaces params of one named benchmark: {sorted(replaced)}", file=sys.stderr)
        return 1
    out_dir = StateLayout(load_config().state_home).bench
    for name in names:
        defaults, run = BENCHMARKS[name]
        params = defaults | {key: yaml.safe_load(value) for key, value in replaced.items()}
        report_name = "-".join([name, *(f"{key}={value}" for key, value in replaced.items())])
        print(f"== {report_name} {json.dumps(params)}", flush=True)
        results = run(params)
        # BLAS settings change numpy's and the JVM's speed: every report says which it ran under.
        results["blas_env"] = {name: os.environ.get(name) for name in BLAS_SETTINGS}
        report = {"name": report_name, "params": params, "results": results}
        if "published" in results:  # peer numbers also at the top level, beside ours
            report["published"] = results["published"]
        write_json(out_dir / f"{report_name}.json", report)
        print(json.dumps(report["results"], indent=2))
        print(f"wrote {out_dir / f'{report_name}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
