"""The landmark predictor learns to put a reference face's shape into a driving face's pose."""

from __future__ import annotations

import math

import numpy as np
import torch

from stylid_core.customize.facesnap.config import FaceSnapModelConfig
from stylid_core.customize.facesnap.faceprep import relative_landmarks
from stylid_core.customize.facesnap.landmarks import (
    LandmarkPredictor,
    keypoints5_from_68,
    landmark_loss,
    pose_angles_from_landmarks,
)


def _similarity(points: torch.Tensor, angle: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    center = points.mean(1, keepdim=True)
    return (points - center) @ rot.transpose(1, 2) * scale.view(-1, 1, 1) + center + shift.view(-1, 1, 2)


def _triplets(base: torch.Tensor, n: int, g: torch.Generator):
    """(reference, driving, target): two identities made from ``base`` (stretch + jitter); the target is identity A
    in the driving face's rotation/scale/position, the reference identity A in another one."""
    center = base.mean(0)
    stretch = 1 + 0.1 * torch.randn(2 * n, 1, 2, generator=g)
    shapes = (base[None] - center) * stretch + center + 0.003 * torch.randn(2 * n, 68, 2, generator=g)
    a, b = shapes[:n], shapes[n:]

    def pose():
        angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(30)
        scale = 0.8 + 0.4 * torch.rand(n, generator=g)
        shift = 0.1 * (torch.rand(n, 2, generator=g) * 2 - 1)
        return angle, scale, shift

    p1, p2 = pose(), pose()
    return _similarity(a, *p1), _similarity(b, *p2), _similarity(a, *p2)


def test_predictor_learns_pose_transfer_on_real_landmarks(astronaut, astronaut_face):
    base = torch.from_numpy(relative_landmarks(astronaut_face.landmarks, *astronaut.shape[:2]))
    torch.set_num_threads(1)  # small matmuls: threads only add overhead
    torch.manual_seed(0)
    predictor = LandmarkPredictor(FaceSnapModelConfig(predictor_hidden=128, predictor_depth=3))
    held_out = _triplets(base, 256, torch.Generator().manual_seed(99))
    pool = _triplets(base, 4096, torch.Generator().manual_seed(0))

    def error() -> float:
        with torch.no_grad():
            return float(landmark_loss(predictor(held_out[0], driving_landmarks=held_out[1])[0], held_out[2]))

    untrained = error()
    opt = torch.optim.Adam(predictor.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        idx = torch.randint(0, 4096, (64,), generator=g)
        ref, drv, tgt = (x[idx] for x in pool)
        loss = landmark_loss(predictor(ref, driving_landmarks=drv)[0], tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = error()
    assert untrained > 0.05  # the poses differ by up to 60 degrees
    assert trained < 0.25 * untrained, (untrained, trained)
    # and it keeps the reference's shape rather than copying the driving face
    with torch.no_grad():
        copy_driver = float(landmark_loss(held_out[1], held_out[2]))
    assert trained < copy_driver


def test_pose_angles_follow_roll_and_yaw(astronaut_face):
    lm = np.asarray(astronaut_face.landmarks, np.float64)
    yaw0, pitch0, roll0 = pose_angles_from_landmarks(lm)
    center = lm.mean(0)
    a = math.radians(20)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rolled = (lm - center) @ rot.T + center
    assert abs(pose_angles_from_landmarks(rolled)[2] - roll0 - a) < 1e-3
    assert abs(pose_angles_from_landmarks(rolled)[0] - yaw0) < 1e-3
    kp = keypoints5_from_68(lm)
    turned = kp.copy()
    turned[2, 0] += 0.3 * np.linalg.norm(kp[1] - kp[0])  # nose moves sideways: the head turns
    assert pose_angles_from_landmarks(turned)[0] > yaw0 + 0.2
