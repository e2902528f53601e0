"""spark-submit entry point of `recsys spark-archive`: a small job whose JVM archives the classes it
loads as it exits (see recsys_pipeline.spark.archive_driver_classes). Argument: a scratch folder."""

import sys
from pathlib import Path

from pyspark.sql import SparkSession

from recsys_pipeline.spark import exercise

if __name__ == "__main__":
    session = SparkSession.builder.appName("recsys-archive-classes").getOrCreate()
    try:
        exercise(session, Path(sys.argv[1]))
    finally:
        session.stop()
