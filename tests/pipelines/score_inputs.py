"""Inputs of the ``stylid score`` tests: a finished ``stylid run`` over scenes of three faces each, and seeded
degradations of its outputs (blur, shrunken faces, a colour shift)."""

from __future__ import annotations

import os
from collections.abc import Callable

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from stylid_core.config import JobConfig
from stylid_core.sample_data import background, build_scene
from tests.stored_rows import stored_rows

#: three faces per scene, at 52-60 px (dlib finds them at 55-78 px: two size buckets, 3 and 6 faces)
LAYOUTS = {
    "a": [("obama", 56), ("biden", 56), ("grace_hopper", 56)],
    "b": [("obama2", 60), ("obama3", 60), ("astronaut", 60)],
    "c": [("biden", 52), ("grace_hopper", 60), ("obama3", 54)],
}
#: what the run gives each id
RUN_STATUS = {"a": "ok", "b": "ok", "c": "ok", "noface": "no_face", "gone": "missing"}
#: the run's config: the embedded default without the no-mosaic comparison (half the stylization work)
RUN_CONFIG = {"score": {"compare_without_mosaic": False}}


@pytest.fixture(scope="session")
def score_run(ray_session, tmp_path_factory) -> dict:
    """A finished ``stylid run`` (real local Ray) over ``LAYOUTS``, a face-free image and a missing file."""
    from jobs.run import run_job

    d = tmp_path_factory.mktemp("score-inputs")
    rows = []
    for image_id, layout in LAYOUTS.items():
        scene, _ = build_scene(layout)
        Image.fromarray(scene).save(d / f"{image_id}.png")
        rows.append({"image_id": image_id, "image_uri": str(d / f"{image_id}.png")})
    Image.fromarray(background(160, 120)).save(d / "noface.png")
    rows += [{"image_id": "noface", "image_uri": str(d / "noface.png")},
             {"image_id": "gone", "image_uri": str(d / "no-such-file.png")}]  # fmt: skip
    manifest = str(d / "manifest.parquet")
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    output = str(d / "run")
    info = run_job(JobConfig.from_dict(RUN_CONFIG), output, manifest, report=False)
    return {"output": output, "manifest": manifest, "info": info, "dir": str(d)}


def score_input(manifest_uri: str, default_style_uri: str | None = None) -> pd.DataFrame:
    """``stylid score``'s input as one frame: the plan's pass over the ids (``ManifestReader.scan_ids``, which
    refuses duplicates), then every prepared batch of ``iter_score_manifest`` (a pairs manifest or a stylid output
    folder), joined, styles as plain strings."""
    from pipelines.score import iter_score_manifest

    reader = iter_score_manifest(manifest_uri, default_style_uri)
    reader.scan_ids()
    table = pa.concat_tables(list(reader), promote_options="permissive")
    style = table.column("style_uri")
    if pa.types.is_dictionary(style.type):  # the reader's one-style-a-batch encoding
        table = table.set_column(table.column_names.index("style_uri"), "style_uri", style.cast(pa.string()))
    return table.to_pandas()


def read_output_image(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def blur(image: np.ndarray, faces: pd.DataFrame) -> np.ndarray:
    return cv2.GaussianBlur(image, (0, 0), 2.5)


def shrink_faces(image: np.ndarray, faces: pd.DataFrame) -> np.ndarray:
    """Each face (with a 30% margin) shrunk to 60% in place, over a blurred copy of its surroundings."""
    image = image.copy()
    for _, f in faces.iterrows():
        x0, y0, x1, y1 = (int(round(v)) for v in (f.x0, f.y0, f.x1, f.y1))
        m = int(0.3 * (x1 - x0))
        X0, Y0, X1, Y1 = max(0, x0 - m), max(0, y0 - m), min(image.shape[1], x1 + m), min(image.shape[0], y1 + m)
        crop = image[Y0:Y1, X0:X1].copy()
        small = cv2.resize(crop, (int(crop.shape[1] * 0.6), int(crop.shape[0] * 0.6)), interpolation=cv2.INTER_AREA)
        patch = cv2.GaussianBlur(crop, (0, 0), 6)
        oy, ox = (crop.shape[0] - small.shape[0]) // 2, (crop.shape[1] - small.shape[1]) // 2
        patch[oy : oy + small.shape[0], ox : ox + small.shape[1]] = small
        image[Y0:Y1, X0:X1] = patch
    return image


def colour_shift(image: np.ndarray, faces: pd.DataFrame) -> np.ndarray:
    shifted = image.astype(np.int16)
    shifted[..., 0] += 45
    shifted[..., 2] -= 45
    return np.clip(shifted, 0, 255).astype(np.uint8)


def degraded_manifest(
    run: dict, folder: str, degrade: Callable[[np.ndarray, pd.DataFrame], np.ndarray], ids=("a", "b", "c")
) -> str:
    """A score manifest pairing each source of ``run`` with its output degraded by ``degrade`` (written under
    ``folder``), plus the run's failed rows with their source and no output (every id of the run, once)."""
    metrics = stored_rows(os.path.join(run["output"], "metrics")).set_index("image_id")
    faces = stored_rows(os.path.join(run["output"], "faces"))
    os.makedirs(folder, exist_ok=True)
    rows = []
    for image_id in ids:
        out = degrade(read_output_image(metrics.at[image_id, "output_uri"]), faces[faces["image_id"] == image_id])
        path = os.path.join(folder, f"{image_id}.png")
        Image.fromarray(out).save(path)
        rows.append({"image_id": image_id, "source_uri": metrics.at[image_id, "image_uri"], "output_uri": path})
    for image_id in sorted(set(RUN_STATUS) - set(LAYOUTS)):  # the run's failed rows: a source and no output
        rows.append({"image_id": image_id, "source_uri": metrics.at[image_id, "image_uri"], "output_uri": None})
    manifest = os.path.join(folder, "pairs.parquet")
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    return manifest
