"""``template_landmarks68``: 68 drawn landmarks in dlib's order, usable wherever dlib's predictor would be."""

from __future__ import annotations

import numpy as np
from skimage.data import astronaut

from stylid_core.customize.facesnap.faceprep import align_face
from stylid_core.customize.facesnap.landmarks import keypoints5_from_68, template_landmarks68


def test_template_lies_in_its_box_in_dlib_order():
    box = (100.0, 50.0, 300.0, 290.0)
    lm = template_landmarks68(box)
    assert lm.shape == (68, 2) and lm.dtype == np.float32
    assert (lm[:, 0] >= box[0]).all() and (lm[:, 0] <= box[2]).all()
    assert (lm[:, 1] >= box[1]).all() and (lm[:, 1] <= box[3]).all()
    left_eye, right_eye, nose, mouth_l, mouth_r = keypoints5_from_68(lm)
    assert left_eye[0] < nose[0] < right_eye[0] and mouth_l[0] < nose[0] < mouth_r[0]
    assert left_eye[1] == right_eye[1] < nose[1] < mouth_l[1] == mouth_r[1]
    assert lm[8, 1] == lm[:, 1].max()  # the chin is the lowest point
    assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]  # eye corners left to right, outer first


def test_template_aligns_like_a_detected_face():
    box = (176.0, 62.0, 274.0, 183.0)  # the astronaut's face
    crop = align_face(astronaut(), keypoints5_from_68(template_landmarks68(box)), 112)
    assert crop.shape == (112, 112, 3) and crop.std() > 10
