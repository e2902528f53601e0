"""spark-submit entry point: the stages of one Spark job of a declared pipeline, in one application
(``--dag-id`` names the pipeline, ``--job`` the job; see recsys_pipeline.pipelines)."""

import sys

from recsys_pipeline.jobs import run_spark_job

if __name__ == "__main__":
    sys.exit(run_spark_job(sys.argv[1:]))
