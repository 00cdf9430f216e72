"""Box overlap measures (stylid_core.boxes), shared by the score stage and the gate."""

from __future__ import annotations

import numpy as np
import pytest

from stylid_core.boxes import box_iou, pairwise_iou, rowwise_iou


def test_box_overlap_measures():
    a = np.array([[0, 0, 10, 10], [0, 0, 4, 4]], float)
    b = np.array([[5, 0, 15, 10], [0, 0, 4, 4]], float)
    assert box_iou(a[0], b[0]) == pytest.approx(50 / 150)
    np.testing.assert_allclose(rowwise_iou(a, b), [50 / 150, 1.0])
    np.testing.assert_allclose(pairwise_iou(a, b), [[50 / 150, 16 / 100], [0.0, 1.0]])
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
