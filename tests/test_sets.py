import numpy as np
import pytest

from recsys_pipeline.sets import distinct, member_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_distinct_and_member_of_are_numpys_unique_and_isin(dtype) -> None:
    rng = np.random.default_rng(5)
    values = rng.integers(-50, 1 << 20, 20_000).astype(dtype)
    values[:500] = values[500:1000]  # repeats
    np.testing.assert_array_equal(distinct(values), np.unique(values))
    assert distinct(values).dtype == dtype
    keys = rng.integers(0, 1 << 40, (300, 7))
    reference = np.concatenate([keys[::3].ravel(), rng.integers(0, 1 << 40, 1000)])
    found = member_of(keys, reference)
    assert found.shape == keys.shape and 0 < found.sum() < keys.size
    np.testing.assert_array_equal(found, np.isin(keys, reference))
    # Values beyond the largest of the reference, and an empty reference or input.
    np.testing.assert_array_equal(member_of(np.array([1 << 41, 0]), reference), [False, False])
    assert not member_of(keys, np.empty(0, np.int64)).any()
    assert len(distinct(np.empty(0, dtype))) == 0 and len(member_of(np.empty(0, dtype), values)) == 0
