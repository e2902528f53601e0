"""spark-submit entry point of the nightly: ingest the day's events, then build the interactions, in
one Spark application (a night's input is small enough that a second start-up would cost more than
its work)."""

import sys

from recsys_pipeline.jobs import run_spark_job
from recsys_pipeline.stages.ingest import run_ingest
from recsys_pipeline.stages.interactions import run_interactions

if __name__ == "__main__":
    sys.exit(
        run_spark_job(
            {"ingest_events": run_ingest, "build_interactions": run_interactions},
            "recsys-ingest-and-build-interactions",
            sys.argv[1:],
        )
    )
