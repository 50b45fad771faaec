"""The helpers spot-level torch methods share (stbench.torch_method)."""

import numpy as np
import pytest

from stbench.torch_method import group_by_slide, pool_batch_size, spot_batches, spot_pool, standardiser


def test_spot_pool_takes_masks_or_indices_across_slides():
    slides = ["a", "b"]
    masks = {"a": np.array([True, False, True]), "b": np.array([1])}
    assert spot_pool(slides, masks.get) == [(0, 0), (0, 2), (1, 1)]


def test_a_pool_smaller_than_a_batch_caps_it_with_a_warning():
    assert pool_batch_size(200, 128, "m") == 128
    with pytest.warns(UserWarning, match="m: 50 training spots, fewer than a batch of 128: using batches of 50"):
        assert pool_batch_size(50, 128, "m") == 50


def test_batches_are_grouped_by_slide_and_small_ones_skipped():
    pool = [(0, 5), (1, 7), (0, 6), (1, 8), (0, 9)]
    batches = list(spot_batches(pool, ["A", "B"], np.arange(5), size=2, min_size=2))
    assert [[(s, ix.tolist()) for s, ix in b] for b in batches] == [[("A", [5]), ("B", [7])], [("A", [6]), ("B", [8])]]
    assert group_by_slide([(1, 3), (0, 2), (1, 4)], ["A", "B"])[0][0] == "B"
    mean, sd = standardiser(np.array([[1.0, 5.0], [3.0, 5.0]]))
    np.testing.assert_allclose(mean, [2.0, 5.0]) and np.testing.assert_allclose(sd, [1.0, 1.0])
