"""Small inputs for the pipeline tests: a few downscaled real photos, a no-face image and a non-image file."""

from __future__ import annotations

import os

import pandas as pd
import pytest
from PIL import Image

from stylid_core.sample_data import background, build_scene, load_photo


def _save_small(stem: str, path: str, side: int = 200) -> None:
    img = Image.fromarray(load_photo(stem))
    scale = side / max(img.size)
    img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS).save(path, quality=92)


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> dict[str, str]:
    """image_id -> local path: two portraits, a scene with two small faces, a face-free photo, a non-image file."""
    d = tmp_path_factory.mktemp("inputs")
    paths = {}
    for stem in ("obama", "biden"):
        paths[stem] = str(d / f"{stem}.jpg")
        _save_small(stem, paths[stem])
    scene, _ = build_scene([("grace_hopper", 40), ("obama2", 56)], width=320, height=200)
    paths["scene"] = str(d / "scene.png")
    Image.fromarray(scene).save(paths["scene"])
    paths["noface"] = str(d / "noface.png")
    Image.fromarray(background(160, 120)).save(paths["noface"])
    paths["notimage"] = str(d / "notimage.jpg")
    with open(paths["notimage"], "wb") as f:
        f.write(b"this is not a JPEG at all\n" * 20)
    return paths


def write_manifest(path: str, rows: list[dict]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


from tests.pipelines.score_inputs import score_run  # noqa: E402, F401  (the stylid score tests' shared run)


def check_run_fits(config, cpus: float, gpus: float, memory: float | None = None) -> None:
    """``stylid run``'s chain checked against a cluster of ``cpus``, ``gpus``, ``memory``, as ``build_chain`` does."""
    from pipelines.chain import check_chain_fits, fusion_of
    from pipelines.stylize import stylize_chain

    check_chain_fits(stylize_chain(config), fusion_of(config.resources), cpus, gpus, memory)


def run_pool_size(config, cpus: float, memory: float | None = None) -> int:
    """``stylid run``'s fused pool on such a cluster."""
    from pipelines.chain import chain_pool_size, fusion_of
    from pipelines.stylize import stylize_chain

    return chain_pool_size(stylize_chain(config), fusion_of(config.resources), cpus, memory)
