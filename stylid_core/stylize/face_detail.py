"""Face detail transfer: the photo's fine luminance structure carried into the stylized faces, for any engine.

A feed-forward network (or a filter, or a diffusion sampler) re-renders every region of the image, faces included;
the mosaic (``stylid_core.stylize.mosaic``) gives small faces enough pixels to survive that, and the neural engine's
``face_style_strength`` weakens the style inside faces, but both leave the engine's own re-rendering of the face,
which on the neural engine alone costs a quarter to a third of the identity a small face had (README,
``benchmarks/bench_identity.py``). This step is the pixel-space counterpart of the content consistency of arXiv
2506.06802: after stylization, inside a soft mask over each face,

1. both images go to CIE Lab; only the lightness channel ``L`` changes, so the face keeps the stylized **colours**;
2. each ``L`` is split at a Gaussian of ``sigma`` times the face's size: a *base* (tones, light and shade, broad
   strokes) and a *detail* band (edges of the eyes, nose, mouth and jaw: what a face recognizer reads);
3. the stylized face's base is kept and its detail band replaced by the photo's. With ``match_contrast`` the
   photo's detail band is first rescaled to the stylized detail band's standard deviation over the face's crop, so
   the face keeps the stylized image's contrast, and with it the style statistics the style distance measures;
4. ``L = L_stylized + strength * mask * (base_stylized + detail_photo - L_stylized)``; ``mask`` is 1 over the face
   box grown by ``margin`` of its size on each side, Gaussian-feathered to 0 (``face_blend_mask``, which the
   neural engine's ``face_style_strength`` blends through too).

``sigma`` sets how much of the face comes from the photo: larger keeps more of the photo's structure (identity up)
and less of the painted strokes inside the face (face-region style distance up). The default 0.2 meets the 24-48 px
identity targets on *The Starry Night* and *The Scream*; doubling it buys 2 points at 96 px (README's sweep,
``bench_identity.py --detail``).
Outside the masks the image is unchanged, bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np

from stylid_core.config import FaceDetailConfig
from stylid_core.faces.base import Face
from stylid_core.stylize.base import Stylizer, StylizerWrapper


def face_blend_mask(height: int, width: int, faces: list[Face], margin: float) -> np.ndarray:
    """(H, W) float32 mask: 1 over each face box grown by ``margin`` of its size per side, feathered to 0."""
    mask = np.zeros((height, width), dtype=np.float32)
    sizes = []
    for face in faces:
        x0, y0, x1, y1 = face.box
        s = face.size_px
        if s <= 0:
            continue
        g = margin * s
        cv2.rectangle(
            mask,
            (int(np.floor(x0 - g)), int(np.floor(y0 - g))),
            (int(np.ceil(x1 + g)) - 1, int(np.ceil(y1 + g)) - 1),
            1.0,
            thickness=-1,
        )
        sizes.append(s)
    if not sizes:
        return mask
    # feather by a fraction of the median face size: the ramp is inside the grown box and outside the face box
    sigma = max(1.0, 0.25 * margin * float(np.median(sizes)))
    return np.clip(cv2.GaussianBlur(mask, (0, 0), sigma), 0.0, 1.0)


def transfer_face_detail(
    stylized: np.ndarray, content: np.ndarray, faces: list[Face], config: FaceDetailConfig
) -> np.ndarray:
    """``stylized`` (H, W, 3) uint8 with ``content``'s luminance detail inside each face (see the module doc)."""
    stylized = np.asarray(stylized, dtype=np.uint8)
    content = np.asarray(content, dtype=np.uint8)
    if stylized.shape != content.shape:
        raise ValueError(f"stylized {stylized.shape} and content {content.shape} must have the same shape")
    if config.strength <= 0 or not faces:
        return stylized
    out = stylized.copy()
    height, width = out.shape[:2]
    for face in faces:
        size = face.size_px
        if size < 2:
            continue
        x0, y0, x1, y1 = face.box
        sigma = max(0.5, config.sigma * size)
        reach = config.margin * size + 3.0 * sigma  # the mask's extent plus the blur's
        cx0, cy0 = max(0, int(np.floor(x0 - reach))), max(0, int(np.floor(y0 - reach)))
        cx1, cy1 = min(width, int(np.ceil(x1 + reach))), min(height, int(np.ceil(y1 + reach)))
        if cx1 - cx0 < 2 or cy1 - cy0 < 2:
            continue
        local = Face(box=(x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0), keypoints=None, score=1.0)
        mask = face_blend_mask(cy1 - cy0, cx1 - cx0, [local], config.margin)
        inside = mask > 0
        if not inside.any():
            continue
        lab_s = cv2.cvtColor(out[cy0:cy1, cx0:cx1].astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2Lab)
        lab_c = cv2.cvtColor(content[cy0:cy1, cx0:cx1].astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2Lab)
        light_s, light_c = lab_s[..., 0], lab_c[..., 0]
        base_s = cv2.GaussianBlur(light_s, (0, 0), sigma)
        detail_c = light_c - cv2.GaussianBlur(light_c, (0, 0), sigma)
        if config.match_contrast:
            detail_c *= float(np.std(light_s - base_s)) / max(float(np.std(detail_c)), 1e-3)
        lab_s[..., 0] = light_s + (config.strength * mask) * (base_s + detail_c - light_s)
        rgb = np.clip(cv2.cvtColor(lab_s, cv2.COLOR_Lab2RGB) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        region = out[cy0:cy1, cx0:cx1]
        region[inside] = rgb[inside]
    return out


class FaceDetailTransfer(StylizerWrapper):
    """Wraps a ``Stylizer`` (usually the ``MosaicRestorer``) and transfers the photo's face detail into its output."""

    def __init__(self, stylizer: Stylizer, config: FaceDetailConfig | None = None) -> None:
        super().__init__(stylizer)
        self.config = config or FaceDetailConfig()

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        return self.stylizer.working_size(height, width)

    def stylize_batch(  # type: ignore[override]
        self, contents: list[np.ndarray], styles: list[np.ndarray], faces: list[list[Face]] | None = None
    ) -> list[np.ndarray]:
        faces = faces if faces is not None else [[] for _ in contents]
        outs = self.stylizer.stylize_batch(contents, styles, faces)
        return [transfer_face_detail(o, c, fs, self.config) for o, c, fs in zip(outs, contents, faces)]
