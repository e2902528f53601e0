"""Set operations on integer arrays, by sorting.

NumPy 2.3 and later find a plain ``np.unique`` by hashing, which ``np.union1d``, ``np.setdiff1d``
and ``np.isin`` over wide keys call too: on these machines 0.78 s for 1.5M 32-bit integers, where a
sort and a comparison of neighbours take 0.07 s, and 0.43 s for ``np.isin`` of 1M 64-bit keys in
300k, where a sort and a binary search take under 0.1 s.
"""

from __future__ import annotations

import numpy as np


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of ``values`` (``np.unique``)."""
    ordered = np.sort(values, axis=None)
    if len(ordered) == 0:
        return ordered
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def member_of(values: np.ndarray, of: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` is in ``of`` (``np.isin``), shaped as ``values``."""
    reference = np.sort(of, axis=None)
    if len(reference) == 0:
        return np.zeros(np.shape(values), dtype=bool)
    position = np.minimum(np.searchsorted(reference, values), len(reference) - 1)
    return reference[position] == values
