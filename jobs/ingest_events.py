"""spark-submit entry point: ingest the run's events into the lake, quarantining bad records."""

import sys

from recsys_pipeline.jobs import run_spark_job
from recsys_pipeline.stages.ingest import run_ingest

if __name__ == "__main__":
    sys.exit(run_spark_job({"ingest_events": run_ingest}, "recsys-ingest-events", sys.argv[1:]))
