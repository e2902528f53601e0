"""Stage runners: each ``run_*`` reads one run's inputs and writes its outputs.

DAG tasks and ``jobs/`` call only these. Each takes a :class:`~recsys_pipeline.runs.RunContext`
(and a Spark session for the Spark stages), so every path it touches derives from the run's
data interval; the algorithms they call are plain functions over arrays and DataFrames.
"""
