"""Training pairs across photos: with a ``person_id`` column the reference comes from another photo of the same
person (the bundled samples hold three photos of Obama), deterministically from the seed."""

from __future__ import annotations

import random
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.train_customizer import REFERENCE_COLUMN, FacePairStage
from stylid_core.customize.facesnap.faceprep import shared_landmarker, to_square
from stylid_core.customize.facesnap.training import FaceSnapTrainConfig, cross_photo_references
from stylid_core.sample_data import PERSON_OF, load_photo
from tests.customize.training_rows import pair_rows

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


def _python_references(uris: list[str], persons: list, seed: int) -> list[str]:
    """The reference draw written plainly, row by row (what ``pair_rows`` computed in pandas before it streamed):
    the oracle of the vectorised one."""
    no_person = lambda p: p is None or (isinstance(p, float) and np.isnan(p)) or str(p) == ""  # noqa: E731
    photos: dict[str, set[str]] = {}
    for uri, person in zip(uris, persons):
        if not no_person(person):
            photos.setdefault(str(person), set()).add(uri)
    ordered = {person: sorted(p) for person, p in photos.items() if len(p) > 1}
    out = []
    for uri, person in zip(uris, persons):
        others = [] if no_person(person) else [p for p in ordered.get(str(person), ()) if p != uri]
        rng = np.random.default_rng(zlib.crc32(f"{seed}:reference:{uri}".encode()))
        out.append(others[int(rng.integers(len(others)))] if others else uri)
    return out


def test_the_vectorised_references_are_the_row_by_row_draw():
    rng = random.Random(5)
    for _ in range(100):
        n = rng.randint(0, 50)
        uris = [f"/p/{rng.randint(0, 25)}.jpg" for _ in range(n)]
        persons = [rng.choice([None, float("nan"), "", f"id{rng.randint(0, 6)}", f"id{rng.randint(0, 2)}"])
                   for _ in range(n)]  # fmt: skip
        for seed in (0, 11):
            assert cross_photo_references(uris, persons, seed) == _python_references(uris, persons, seed)
    # numeric person ids (a float column with NaN, as pandas writes ints with nulls) group the same
    assert cross_photo_references(["a", "b", "c"], [1.0, 1.0, float("nan")], 0) == _python_references(
        ["a", "b", "c"], [1.0, 1.0, float("nan")], 0
    )


def _training_manifest(tmp_path) -> tuple[str, pd.DataFrame]:
    rng = random.Random(2)
    frames = []
    for part in range(3):
        n = 7 + part
        frames.append(pd.DataFrame({
            "image_uri": [f"/faces/{rng.randint(0, 12)}.jpg" if k % 9 else None for k in range(n)],
            "person_id": [rng.choice([None, "", "ann", "bob", "cy", f"solo{part}{k}"]) for k in range(n)],
            "caption": [f"photo {part}.{k}" if k % 3 else None for k in range(n)],
            "unused": list(range(n)),
        }))  # fmt: skip
    prefix = tmp_path / "train-manifest"
    prefix.mkdir()
    for k, df in enumerate(frames):
        df.to_parquet(prefix / f"part-{k}.parquet", index=False)
    return str(prefix), pd.concat(frames, ignore_index=True)


def test_pair_rows_stream_in_batches_and_equal_the_whole_manifest_pairs(tmp_path):
    """Read projected in small batches across files, the rows are the manifest's (a photo without a URI an empty
    one), with the row-by-row draw's references; the person column stays behind, the unused one is never read."""
    from pipelines.train_customizer import TrainingPairRows

    manifest, whole = _training_manifest(tmp_path)
    config = FaceSnapTrainConfig(manifest=manifest, storage_path=str(tmp_path / "ck"), tiny={}, seed=4)
    rows = TrainingPairRows(config, batch_rows=3)
    tables = list(rows)
    assert [t.num_rows for t in tables] == [3, 3, 1, 3, 3, 2, 3, 3, 3]  # batches, cut at the files
    assert rows.num_rows == len(whole) == 24
    got = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    assert set(got.columns) == {"image_uri", "caption", REFERENCE_COLUMN}
    uris = whole["image_uri"].fillna("").tolist()
    assert got["image_uri"].tolist() == uris
    assert got["caption"].tolist() == whole["caption"].tolist()
    expected = _python_references(uris, whole["person_id"].tolist(), seed=4)
    assert got[REFERENCE_COLUMN].tolist() == expected
    assert sum(r != u for r, u in zip(expected, uris)) >= 5  # the manifest does cross photos
    assert pair_rows(config)[REFERENCE_COLUMN].tolist() == expected
    # without a person column, each photo is its own reference
    no_person = FaceSnapTrainConfig(manifest=manifest, storage_path=str(tmp_path / "ck"), tiny={}, person_column=None)
    assert pair_rows(no_person)[REFERENCE_COLUMN].tolist() == uris


def test_pair_blocks_go_into_ray_block_by_block(tmp_path, ray_session):
    """The training rows enter Ray as blocks put batch by batch (one ref a block, ``input_block_rows`` of the pair
    stage's batches), not as one frame held by the driver."""
    import pyarrow as pa
    import ray

    from pipelines.plan import input_block_rows
    from pipelines.train_customizer import PAIR_BATCH_ROWS, pair_blocks

    manifest, whole = _training_manifest(tmp_path)
    config = FaceSnapTrainConfig(manifest=manifest, storage_path=str(tmp_path / "ck"), tiny={}, seed=4)
    blocks = pair_blocks(config, cpus=2, batch_rows=5)
    per_block = input_block_rows(24, PAIR_BATCH_ROWS, 2)
    tables = ray.get(blocks)
    assert sum(t.num_rows for t in tables) == 24
    # blocks never span two manifest batches (5 rows, cut at the files: 5 2 | 5 3 | 5 4)
    assert [t.num_rows for t in tables] == [4, 1, 2, 4, 1, 3, 4, 1, 4]
    assert all(t.num_rows <= per_block for t in tables)
    assert pa.concat_tables(tables).to_pandas().equals(pair_rows(config))


def test_the_pair_pass_is_a_chain_checked_against_the_cluster():
    from pipelines.chain import build_chain
    from pipelines.train_customizer import PAIR_BATCH_ROWS, pair_chain
    from stylid_core.config import ConfigError

    config = FaceSnapTrainConfig(manifest="m", storage_path="x", tiny={}, pair_cpus=2.0, pair_actors=3)
    (spec,) = pair_chain(config, 32, 128, 68)
    assert spec.cls is FacePairStage and spec.batch_format == "numpy" and spec.max_actors == 3
    assert spec.resources.batch_size == PAIR_BATCH_ROWS and spec.resources.num_cpus == 2.0
    assert spec.kwargs["config"] == config.to_dict()
    # a pair actor wider than the cluster is a ConfigError before any stage starts, not a pool that never starts
    with pytest.raises(ConfigError, match="pairs: 2 CPU"):
        build_chain(None, [spec], cluster={"CPU": 1.0})
