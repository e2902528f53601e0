"""spark-submit entry point: build the confidence matrix, holdout and stable ID maps."""

import sys

from recsys_pipeline.jobs import run_spark_job
from recsys_pipeline.stages.interactions import run_interactions

if __name__ == "__main__":
    sys.exit(
        run_spark_job({"build_interactions": run_interactions}, "recsys-build-interactions", sys.argv[1:])
    )
