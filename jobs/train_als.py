"""spark-submit entry point: train ALS (implicit on the driver, or Spark MLlib) after an optional sweep."""

import sys

from recsys_pipeline.jobs import run_spark_job
from recsys_pipeline.stages.train import run_training

if __name__ == "__main__":
    sys.exit(run_spark_job({"train": run_training}, "recsys-train-als", sys.argv[1:]))
