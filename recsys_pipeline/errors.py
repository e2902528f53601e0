"""The one base class for errors meant for the person running the pipeline.

Every ``RecsysError`` says what failed and what to do about it. ``jobs`` and the CLI print
these as one line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

# The exit code of a spark-submit job that failed with a RecsysError: retrying cannot help.
USER_ERROR_EXIT = 3


class RecsysError(Exception):
    """A failure the user can act on: bad input, a failed gate, a missing version, a bad request."""


class StageSkipped(Exception):  # noqa: N818 (not an error: the stage had nothing to do, by request)
    """The stage was asked not to act (e.g. a dry run's promotion); the task is marked skipped."""
