"""Landmark predictor (reference shape + target pose -> target landmarks), pose angles and landmark maps.

Landmarks are (x, y) in coordinates relative to their (square) image: 0..1 on both axes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from stylid_core.customize.facesnap.config import FaceSnapModelConfig

#: index ranges of the 68-point (iBUG/dlib) layout drawn as separate landmark-map channels
LANDMARK_GROUPS_68: tuple[tuple[int, int], ...] = ((0, 17), (17, 27), (27, 36), (36, 48), (48, 68))


def normalize_landmarks(points: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 2) -> (points centred and divided by their RMS radius, centre (B, 1, 2), scale (B, 1, 1))."""
    center = points.mean(dim=1, keepdim=True)
    scale = (points - center).pow(2).sum(-1).mean(-1, keepdim=True).sqrt().unsqueeze(-1).clamp_min(eps)
    return (points - center) / scale, center, scale


def keypoints5_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The five ArcFace-order keypoints (eyes, nose tip, mouth corners) of 68 iBUG landmarks."""
    lm = np.asarray(landmarks, dtype=np.float32)
    return np.stack([lm[36:42].mean(0), lm[42:48].mean(0), lm[30], lm[48], lm[54]]).astype(np.float32)


def template_landmarks68(box: tuple[float, float, float, float]) -> np.ndarray:
    """A frontal face's 68 iBUG landmarks (pixels) drawn geometrically inside ``box`` (x0, y0, x1, y1).

    Jaw on a half-ellipse, brows and eyes on arcs and ellipses, nose on the centre line, mouth on two ellipses, in
    dlib's point order. For benchmarks and tests that need 68 plausible points without dlib's predictor file.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0

    def pts(u, v) -> np.ndarray:  # box-relative (0..1) -> pixels
        return np.stack([x0 + np.asarray(u) * w, y0 + np.asarray(v) * h], axis=1)

    jaw = np.linspace(math.pi, 0.0, 17)  # from the left temple, under the chin, to the right temple
    brow = np.linspace(0.0, 1.0, 5)
    eye = np.linspace(math.pi, -math.pi, 7)[:6]  # 6 points from the outer corner, over the top, round the bottom
    outer = np.linspace(math.pi, -math.pi, 13)[:12]
    inner = np.linspace(math.pi, -math.pi, 9)[:8]
    parts = [
        pts(0.5 + 0.48 * np.cos(jaw), 0.35 + 0.6 * np.sin(jaw)),  # 0-16 jaw
        pts(0.12 + 0.26 * brow, 0.3 - 0.06 * np.sin(brow * math.pi)),  # 17-21 right brow (image left)
        pts(0.62 + 0.26 * brow, 0.3 - 0.06 * np.sin(brow * math.pi)),  # 22-26 left brow
        pts(np.full(4, 0.5), np.linspace(0.38, 0.58, 4)),  # 27-30 nose bridge down to the tip
        pts(np.linspace(0.42, 0.58, 5), 0.64 + 0.02 * np.sin(np.linspace(0.0, math.pi, 5))),  # 31-35 nostrils
        pts(0.31 + 0.08 * np.cos(eye), 0.4 - 0.035 * np.sin(eye)),  # 36-41 right eye
        pts(0.69 + 0.08 * np.cos(eye), 0.4 - 0.035 * np.sin(eye)),  # 42-47 left eye
        pts(0.5 + 0.16 * np.cos(outer), 0.78 - 0.06 * np.sin(outer)),  # 48-59 outer lips (48, 54: corners)
        pts(0.5 + 0.11 * np.cos(inner), 0.78 - 0.025 * np.sin(inner)),  # 60-67 inner lips
    ]
    return np.concatenate(parts).astype(np.float32)


def pose_angles_from_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """A crude (yaw, pitch, roll) in radians from 5 or 68 landmarks, enough to drive the predictor by angles.

    Roll is the eye line's angle; yaw the nose's sideways offset from the eye-mouth midline, pitch its height
    between the eyes and the mouth, both relative to a frontal face, each mapped through arcsin.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    kp = keypoints5_from_68(lm).astype(np.float64) if len(lm) == 68 else lm
    left_eye, right_eye, nose, mouth_l, mouth_r = kp
    dx, dy = right_eye - left_eye
    roll = math.atan2(dy, dx)
    c, s = math.cos(-roll), math.sin(-roll)
    rot = np.array([[c, -s], [s, c]])
    eye_mid = rot @ ((left_eye + right_eye) / 2)
    mouth_mid = rot @ ((mouth_l + mouth_r) / 2)
    nose = rot @ nose
    eye_dist = max(float(np.hypot(dx, dy)), 1e-6)
    yaw = math.asin(float(np.clip(2.0 * (nose[0] - (eye_mid[0] + mouth_mid[0]) / 2) / eye_dist, -1, 1)))
    height = max(float(mouth_mid[1] - eye_mid[1]), 1e-6)
    pitch = math.asin(float(np.clip(2.0 * ((nose[1] - eye_mid[1]) / height - 0.6), -1, 1)))
    return np.array([yaw, pitch, roll], dtype=np.float32)


def _mlp(dim_in: int, hidden: int, dim_out: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = dim_in
    for _ in range(depth - 1):
        layers += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    layers.append(nn.Linear(d, dim_out))
    return nn.Sequential(*layers)


class LandmarkPredictor(nn.Module):
    """Predicts the landmarks the reference face would have in a target pose/expression.

    The reference's landmarks fix the identity's shape; the target pose comes from a driving face's landmarks or
    from (yaw, pitch, roll) angles. Both landmark sets are normalised (centred, unit RMS radius) so the network only
    sees shape and pose; it outputs a correction of the normalised reference shape (zero at initialisation), which
    is placed where the driving face is (or, driven by angles, where the reference is).
    """

    def __init__(self, config: FaceSnapModelConfig) -> None:
        super().__init__()
        self.config = config
        n2, h, depth = config.num_landmarks * 2, config.predictor_hidden, config.predictor_depth
        self.shape_encoder = _mlp(n2, h, h, depth)
        self.pose_from_landmarks = _mlp(n2, h, h, depth)
        self.pose_from_angles = _mlp(6, h, h, depth)
        self.decoder = _mlp(2 * h + n2, h, n2, depth)
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(
        self,
        reference_landmarks: torch.Tensor,
        driving_landmarks: torch.Tensor | None = None,
        pose_angles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target landmarks (B, N, 2) in relative image coordinates, and the same in the normalised frame.

        ``driving_landmarks`` (B, N, 2) takes precedence over ``pose_angles`` (B, 3: yaw, pitch, roll in radians).
        """
        b, n = reference_landmarks.shape[:2]
        if n != self.config.num_landmarks:
            raise ValueError(f"expected {self.config.num_landmarks} landmarks, got {n}")
        ref_n, ref_c, ref_s = normalize_landmarks(reference_landmarks)
        if driving_landmarks is not None:
            drv_n, center, scale = normalize_landmarks(driving_landmarks.to(ref_n.dtype))
            pose = self.pose_from_landmarks(drv_n.reshape(b, -1))
        elif pose_angles is not None:
            a = pose_angles.to(ref_n.dtype).reshape(b, 3)
            pose = self.pose_from_angles(torch.cat([a.sin(), a.cos()], dim=-1))
            center, scale = ref_c, ref_s
        else:
            raise ValueError("the landmark predictor needs driving_landmarks or pose_angles")
        flat = ref_n.reshape(b, -1)
        delta = self.decoder(torch.cat([self.shape_encoder(flat), pose, flat], dim=-1))
        pred_n = ref_n + delta.view(b, n, 2)
        return pred_n * scale + center, pred_n


def landmark_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared landmark error measured in units of the target face's RMS radius (scale-free)."""
    _, center, scale = normalize_landmarks(target)
    return ((predicted - target) / scale).pow(2).sum(-1).mean()


def render_landmark_map(
    landmarks: torch.Tensor, height: int, width: int, channels: int = 5, sigma: float = 1.0
) -> torch.Tensor:
    """Draw landmarks (B, N, 2; relative coords) as Gaussian blobs: (B, channels, height, width) in [0, 1].

    With 5 channels, 68-point sets go jaw / brows / nose / eyes / mouth and 5-point sets one point per channel.
    """
    b, n, _ = landmarks.shape
    ys = torch.arange(height, device=landmarks.device, dtype=landmarks.dtype) + 0.5
    xs = torch.arange(width, device=landmarks.device, dtype=landmarks.dtype) + 0.5
    px = landmarks[..., 0] * width  # (B, N)
    py = landmarks[..., 1] * height
    d2 = (xs.view(1, 1, 1, -1) - px[..., None, None]) ** 2 + (ys.view(1, 1, -1, 1) - py[..., None, None]) ** 2
    blobs = torch.exp(-d2 / (2 * sigma**2))  # (B, N, H, W)
    if channels == 1:
        return blobs.amax(dim=1, keepdim=True)
    groups = LANDMARK_GROUPS_68 if n == 68 else tuple((i, i + 1) for i in range(n))
    if len(groups) != channels:
        raise ValueError(f"cannot draw {n} landmarks into {channels} channels")
    return torch.stack([blobs[:, a:z].amax(dim=1) for a, z in groups], dim=1)
