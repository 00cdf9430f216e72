"""Shared fixtures: tiny SD components, the astronaut's real face and dlib landmarks. No downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from stylid_core.faces.base import Face  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # tiny tensors: more threads only add overhead on 2 shared cores


@pytest.fixture(scope="session")
def ray_local(ray_session):
    """The session's one local Ray (``tests/conftest.py``): a second ``ray.init`` in the same run would fail."""
    return ray_session


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage.data import astronaut as load

    return load()


@pytest.fixture(scope="session")
def astronaut_face(astronaut) -> Face:
    """The astronaut's face as a dlib-style ``Face`` (box, 5 keypoints, 128-d embedding, 68 landmarks)."""
    from stylid_core.customize.facesnap.faceprep import shared_landmarker
    from stylid_core.customize.facesnap.landmarks import keypoints5_from_68

    lm = shared_landmarker()
    box = lm.detect(astronaut)[0]
    points = lm.landmarks(astronaut, box)
    return Face(
        box=box,
        keypoints=keypoints5_from_68(points),
        score=1.0,
        embedding=lm.embed(astronaut, box),
        landmarks=points,
    )
