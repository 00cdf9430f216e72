"""Training pairs across photos: with a ``person_id`` column the reference comes from another photo of the same
person (the bundled samples hold three photos of Obama), deterministically from the seed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.train_customizer import REFERENCE_COLUMN, FacePairStage, pair_rows
from stylid_core.customize.facesnap.faceprep import shared_landmarker, to_square
from stylid_core.customize.facesnap.training import FaceSnapTrainConfig, cross_photo_references
from stylid_core.sample_data import PERSON_OF, load_photo

OBAMA = ("obama", "obama2", "obama3")


def test_references_are_other_photos_of_the_same_person():
    uris = ["o1", "o2", "o3", "b1", "n1", "n2", "o1"]
    persons = ["obama", "obama", "obama", "biden", None, float("nan"), "obama"]
    refs = cross_photo_references(uris, persons, seed=0)
    for uri, ref in zip(uris[:3] + uris[-1:], refs[:3] + refs[-1:]):
        assert ref != uri and ref in {"o1", "o2", "o3"}
    assert refs[-1] == refs[0]  # the same photo listed twice draws the same reference
    assert refs[3:6] == ["b1", "n1", "n2"]  # one photo, or no person: the photo itself
    # deterministic from the seed and the URI, whatever the row order
    assert cross_photo_references(uris, persons, seed=0) == refs
    order = [5, 2, 0, 6, 3, 1, 4]
    assert cross_photo_references([uris[i] for i in order], [persons[i] for i in order], 0) == [refs[i] for i in order]
    # other seeds draw other references (two choices per Obama photo)
    assert any(cross_photo_references(uris, persons, seed=s)[:3] != refs[:3] for s in range(1, 10))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, str]:
    """Half-size copies of the bundled photos of Obama (three) and Biden (one)."""
    d = tmp_path_factory.mktemp("people")
    paths = {}
    for stem in (*OBAMA, "biden"):
        img = Image.fromarray(load_photo(stem))
        img = img.resize((img.width // 2, img.height // 2), Image.LANCZOS)
        paths[stem] = str(d / f"{stem}.png")
        img.save(paths[stem])
    return paths


def test_pairs_cross_photos_of_the_same_person(tmp_path, photos):
    rows = [{"image_uri": p, "person_id": PERSON_OF[stem], "caption": stem} for stem, p in photos.items()]
    manifest = str(tmp_path / "manifest.parquet")
    pd.DataFrame(rows).to_parquet(manifest)
    config = FaceSnapTrainConfig(manifest=manifest, storage_path=str(tmp_path / "ck"), tiny={}, seed=3)
    df = pair_rows(config)
    stem_of = {p: s for s, p in photos.items()}
    refs = dict(zip(df["image_uri"].map(stem_of), df[REFERENCE_COLUMN].map(stem_of)))
    assert refs["biden"] == "biden"  # one photo: the same photo
    assert all(refs[s] in OBAMA and refs[s] != s for s in OBAMA)

    batch = {c: df[c].to_numpy() for c in df.columns}
    pairs = FacePairStage(config.to_dict(), clip_size=32, face_embed_dim=128, num_landmarks=68)(batch)
    assert list(pairs["caption"]) == list(df["caption"])  # every photo gave a pair, in manifest order
    lm = shared_landmarker()
    embedding = {}
    for stem, path in photos.items():
        img = np.asarray(Image.open(path).convert("RGB"))
        embedding[stem] = lm.embed(img, lm.detect(img)[0])
    for i, stem in enumerate(df["caption"]):
        own = np.asarray(Image.open(photos[stem]).convert("RGB"))
        # the target is the row's own photo; identity (embedding) and reference crop come from the reference photo
        assert np.array_equal(pairs["target"][i], to_square(own, config.resolution))
        np.testing.assert_allclose(pairs["embedding"][i], embedding[refs[stem]], atol=1e-5)
        if stem in OBAMA:
            assert np.linalg.norm(pairs["embedding"][i] - embedding[stem]) > 0.1  # not the target's own
            assert np.linalg.norm(embedding[refs[stem]] - embedding[stem]) < 0.6  # dlib: the same person
