"""spark-submit entry point: the stages of one Spark job of a declared pipeline, in one application
(``--dag-id`` names the pipeline, ``--job`` the job; see recsys_pipeline.pipelines)."""

import sys

from recsys_pipeline.spark import installed_pyspark_first

if __name__ == "__main__":
    # Before anything imports pyspark: the installed copy, not the zip spark-submit put first.
    sys.path[:] = installed_pyspark_first(sys.path)
    from recsys_pipeline.jobs import run_spark_job

    sys.exit(run_spark_job(sys.argv[1:]))
