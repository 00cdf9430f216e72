"""``stylid customize``'s chain on every job's stages (``LoadStage``, ``FaceStage``, ``WriteStage``, and ``stylid
score``'s re-detection rule), one test per defect its own copy of the stages had: the image key (an id with ``/``
or ``..``), the write's retries (``io.retry``), credentials in error text, references decoded without
``io.max_work_pixels``, images PNG-encoded between stages, and a re-detection of its own. No Ray: the stage classes
in this process."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pandas as pd
import pytest

from pipelines.customize import customize_chain
from stylid_core.imageio import encode_png
from stylid_core.secrets import REDACTED

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "customize_tiny.yaml")


def _config(**io):
    from jobs.config import load_config

    config = load_config("customize", CONFIG)
    return type(config).from_dict({**config.to_dict(), "io": {**config.to_dict()["io"], **io}})


def _writer(output: str, config):
    """The chain's write stage as ``customize_chain`` declares it: every job's ``WriteStage``, k images a row."""
    return customize_chain(config, output)[-1].make()


def _generated(image_id: str, images: list[np.ndarray]) -> dict:
    """A row as the score stage hands it to the write stage: raw generated pixels and their faces/ records."""
    gens = [{"gen_index": k, "detected": False, "id_sim": None, "id_dist": None, "id_match": False,
             "backend": "dlib"} for k in range(len(images))]  # fmt: skip
    return {"image_id": image_id, "reference_uri": "/r.png", "prompt": "p", "num_images": len(images),
            "status": "ok", "error": None, "backend": "facesnap", "model": "tiny",
            "gen_pixels": [im.tobytes() for im in images], "gen_height": [im.shape[0] for im in images],
            "gen_width": [im.shape[1] for im in images], "gen_json": json.dumps(gens)}  # fmt: skip


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_an_id_with_a_slash_or_dots_is_written_under_images(tmp_path):
    """The one key rule (``object_key``): ``../x`` and ``a/b`` land as files directly in ``images/``, nowhere else,
    and distinct ids get distinct files."""
    out = tmp_path / "run" / "out"
    config = _config()
    image = np.full((8, 8, 3), 100, np.uint8)
    rows = [_generated(i, [image, image]) for i in ("../x", "a/b", "../../etc/y", "ok")]
    table = _writer(str(out), config)(pd.DataFrame(rows))
    assert table.column("status").to_pylist() == ["ok"] * 4
    written = _files(tmp_path)
    assert len(written) == 8 and all(os.path.dirname(p) == os.path.join("run", "out", "images") for p in written)
    uris = [u for js in table.column("output_uris").to_pylist() for u in json.loads(js)]
    assert len(set(uris)) == 8 and all(os.path.dirname(u) == str(out / "images") for u in uris)
    assert os.path.basename(uris[-1]) == f"ok-{config.config_hash()}-1.png"


def test_the_write_stage_is_every_jobs_with_k_images_a_row(tmp_path):
    """``WriteStage`` (``stylid run``'s) writes each row's k generated images and hands on the customize ledger's
    metrics row with one face row per generated image; a row that did not generate writes nothing."""
    from pipelines.schema import CUSTOMIZE_FACE_COLUMNS, CUSTOMIZE_METRICS_COLUMNS
    from pipelines.stages import WriteStage
    from stylid_core.ledger import FACE_ROWS

    config = _config()
    assert customize_chain(config)[-1].cls is WriteStage
    image = np.full((8, 8, 3), 100, np.uint8)
    failed = {**_generated("bad", []), "status": "no_face", "error": "no face", "gen_pixels": None,
              "gen_width": None, "gen_height": None, "gen_json": None}  # fmt: skip
    table = _writer(str(tmp_path), config)(pd.DataFrame([_generated("a", [image, image, image]), failed]))
    assert table.column_names == [*CUSTOMIZE_METRICS_COLUMNS, FACE_ROWS]
    assert table.column("status").to_pylist() == ["ok", "no_face"]
    uris = table.column("output_uris").to_pylist()
    assert len(json.loads(uris[0])) == 3 and uris[1] is None
    faces = table.column(FACE_ROWS).to_pylist()
    assert [f["gen_index"] for f in faces[0]] == [0, 1, 2] and faces[1] == []
    assert list(faces[0][0]) == list(CUSTOMIZE_FACE_COLUMNS) and {f["image_id"] for f in faces[0]} == {"a"}
    assert table.column("t_write")[0].as_py() is not None and table.column("config_hash")[1].as_py()
    assert _files(tmp_path) == [f"images/a-{config.config_hash()}-{k}.png" for k in range(3)]


def _flaky_replace(monkeypatch, failures: int) -> list[int]:
    """The local write's rename fails ``failures`` times with a transient error (EAGAIN), then works."""
    import stylid_core.storage as storage

    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(1)
        if len(calls) <= failures:
            raise OSError(errno.EAGAIN, "resource temporarily unavailable")
        return real(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace)
    return calls


def test_the_write_retries_as_the_config_says(tmp_path, monkeypatch):
    """``io.retries`` governs the image write: six transient failures pass with 8 tries (the built-in default
    is 5), and with one try a single failure is the row's ``write_error``."""
    image = np.full((8, 8, 3), 100, np.uint8)
    calls = _flaky_replace(monkeypatch, failures=6)
    table = _writer(str(tmp_path / "a"), _config(retries=8, retry_backoff_s=0))(
        pd.DataFrame([_generated("r", [image])])
    )
    assert table.column("status").to_pylist() == ["ok"] and len(calls) == 7
    calls = _flaky_replace(monkeypatch, failures=1)
    table = _writer(str(tmp_path / "b"), _config(retries=1, retry_backoff_s=0))(
        pd.DataFrame([_generated("r", [image])])
    )
    assert table.column("status").to_pylist() == ["write_error"] and len(calls) == 1


def test_credentials_are_scrubbed_from_error_text(tmp_path, monkeypatch):
    """A write error quoting the storage credentials reaches the metrics with them redacted."""
    import pipelines.stages

    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"

    def denied(uri, data, storage_options=None, retry=None):
        raise OSError(f"access denied for secret={secret} writing {uri}")

    monkeypatch.setattr(pipelines.stages, "write_bytes", denied)
    config = _config(storage_options={"key": "AKIAEXAMPLEKEYID", "secret": secret})
    table = _writer(str(tmp_path), config)(pd.DataFrame([_generated("r", [np.zeros((4, 4, 3), np.uint8)])]))
    (error,) = table.column("error").to_pylist()
    assert table.column("status").to_pylist() == ["write_error"]
    assert secret not in error and REDACTED in error and "access denied" in error


def _reference_rows(config, rows: list[dict]) -> list[dict]:
    """``rows`` through the chain's first two stages as ``customize_chain`` declares them: every job's
    ``LoadStage`` (reference and pose) and ``FaceStage`` (the reference's largest face)."""
    load, faces = (spec.make() for spec in customize_chain(config)[:2])
    return faces(load(pd.DataFrame(rows)).to_pandas()).to_pylist()


def test_the_chain_starts_with_every_jobs_load_and_face_stages():
    from pipelines.stages import FaceStage, LoadStage

    specs = customize_chain(_config())
    assert [s.cls for s in specs[:2]] == [LoadStage, FaceStage] and [s.kind for s in specs[:2]] == ["io", "cpu"]
    assert [im.uri for im in specs[0].kwargs["images"]] == ["reference_uri", "pose_uri"]
    assert specs[1].name == "reference" and specs[1].kwargs["max_faces"] == 1


def test_references_are_decoded_at_the_working_size_and_passed_as_pixels(tmp_path, astronaut):
    """The reference and the pose are read as every job reads its images (``LoadStage``: downscaled to
    ``io.max_work_pixels``) and go on as raw RGB pixels of that size, not PNG bytes to decode again; the face is
    found in the working-size reference (``FaceStage``)."""
    ref, pose = tmp_path / "ref.png", tmp_path / "pose.png"
    ref.write_bytes(encode_png(astronaut))  # 512 x 512
    pose.write_bytes(encode_png(np.ascontiguousarray(astronaut[:, ::-1])))
    row = {"image_id": "a", "reference_uri": str(ref), "pose_uri": str(pose), "prompt": "p", "num_images": 1,
           "status": "ok", "error": None, "backend": "facesnap"}  # fmt: skip
    (full,) = _reference_rows(_config(), [row])
    assert full["status"] == "ok", full["error"]
    assert (full["ref_width"], full["ref_height"]) == (512, 512) and full["ref_pixels"] == astronaut.tobytes()
    assert not full["ref_pixels"].startswith(b"\x89PNG") and len(full["pose_pixels"]) == 512 * 512 * 3
    assert full["num_images"] == 1 and full["prompt"] == "p" and full["n_faces"] == 1
    (small,) = _reference_rows(_config(max_work_pixels=256 * 256), [row])
    assert small["status"] == "ok", small["error"]
    assert (small["ref_width"], small["ref_height"]) == (256, 256) and len(small["ref_pixels"]) == 256 * 256 * 3
    assert (small["pose_width"], small["pose_height"]) == (256, 256)
    assert (small["source_width"], small["source_height"]) == (512, 512)  # the reference's own size
    (face,) = json.loads(small["faces_json"])
    assert face["box"][2] <= 256 and face["box"][3] <= 256 and len(face["embedding"]) == 128  # found there


@pytest.mark.parametrize("name", ["missing.png", "bad.png", "pose"])
def test_an_unreadable_reference_or_pose_is_its_row_status_naming_the_uri(tmp_path, astronaut, name):
    """A reference (or pose) that cannot be read is the row's status, naming its URI (and, for the pose, the
    column), and the face stage passes the row on untouched."""
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "ref.png").write_bytes(encode_png(astronaut))
    ref = str(tmp_path / ("ref.png" if name == "pose" else name))
    pose = str(tmp_path / "gone.png") if name == "pose" else None
    row = {"image_id": "a", "reference_uri": ref, "pose_uri": pose, "prompt": "p", "num_images": 1,
           "status": "ok", "error": None, "backend": "facesnap"}  # fmt: skip
    (out,) = _reference_rows(_config(), [row])
    assert out["status"] == {"missing.png": "missing", "bad.png": "decode_error", "pose": "missing"}[name]
    assert (pose or ref) in out["error"] and out["error"].startswith("pose_uri " if pose else ref)
    assert out["faces_json"] is None and out["t_faces"] is None  # the face stage passed it on untouched
    assert (out["ref_pixels"] is None) == (pose is None)  # a reference that could be read was


def _moved_face(astronaut: np.ndarray, scale: float, x: int, y: int) -> np.ndarray:
    """A 'generated' portrait: the astronaut shrunk by ``scale`` and put at (``x``, ``y``) on a 640 x 480 grey
    canvas, so its face is neither where nor as large as in the reference (another aspect ratio too)."""
    from stylid_core.imageio import resize

    side = int(512 * scale)
    canvas = np.full((480, 640, 3), 128, np.uint8)
    canvas[y : y + side, x : x + side] = resize(astronaut, (side, side))
    return canvas


def test_a_generated_face_moved_and_resized_is_scored_by_stylid_scores_redetection(astronaut):
    """``stylid customize`` scores a generated image by ``stylid score``'s re-detection rule, the one function
    (``pipelines.stages.redetect``, then ``identity_scores``), in the one ``ScoreStage``: a face moved and shrunk in
    the output is found where it now is, and both jobs' score stages give it the same similarity, distance and
    match."""
    from pipelines.stages import ScoreStage, identity_scores, redetect
    from stylid_core.config import ScoreConfig
    from stylid_core.faces import create_face_analyzer
    from stylid_core.sample_data import default_style_path

    config = _config()
    spec = customize_chain(config)[3]
    assert spec.cls is ScoreStage and spec.kwargs["generated"] == "gen_pixels"  # every job's score stage
    analyzer = create_face_analyzer(config.faces)
    (reference,) = analyzer.analyze(astronaut, max_faces=1)
    generated = _moved_face(astronaut, 0.6, 300, 150)
    found = redetect(analyzer.detect(generated), reference)
    assert found is not None
    # found inside the pasted astronaut, far from the reference's own box
    assert 300 <= found.box[0] < found.box[2] <= 300 + 307 and 150 <= found.box[1] < found.box[3] <= 150 + 307
    assert found.size_px < 0.8 * reference.size_px and found.box[0] > reference.box[2]
    ((sim, dist, match),) = identity_scores(analyzer, [found], generated)
    assert match and sim > 0.9  # the same person, shrunk

    blank = np.full((64, 64, 3), 200, np.uint8)
    images = [generated, blank]
    row = {"image_id": "a", "status": "ok", "error": None, "prompt": "p",
           "faces_json": json.dumps([reference.to_dict()]), "gen_pixels": [im.tobytes() for im in images],
           "gen_height": [im.shape[0] for im in images], "gen_width": [im.shape[1] for im in images]}  # fmt: skip
    out = spec.make()(pd.DataFrame([row])).to_pylist()[0]
    gens = json.loads(out["gen_json"])
    assert gens[0]["detected"] and (gens[0]["id_sim"], gens[0]["id_dist"], gens[0]["id_match"]) == (sim, dist, match)
    assert not gens[1]["detected"] and gens[1]["id_sim"] is None and gens[1]["id_match"] is False
    assert out["n_faces_found"] == 1 and out["id_match_rate"] == 0.5

    # stylid score of the same pair (the generated image as the output, the reference as source and reference)
    score_row = {"image_id": "a", "status": "ok", "error": None, "image_uri": "/ref.png",
                 "style_uri": default_style_path(), "pixels": astronaut.tobytes(), "width": 512, "height": 512,
                 "ref_pixels": astronaut.tobytes(), "ref_width": 512, "ref_height": 512,
                 "out_pixels": generated.tobytes(), "out_width": 640, "out_height": 480,
                 "faces_json": json.dumps([reference.to_dict()])}  # fmt: skip
    scored = ScoreStage(config.faces, ScoreConfig(), config.io)(pd.DataFrame([score_row])).to_pylist()[0]
    assert scored["status"] == "ok", scored["error"]
    (rec,) = [fj["scores"] for fj in json.loads(scored["faces_json"])]
    assert rec["redetected"] and [rec["x0"], rec["y0"], rec["x1"], rec["y1"]] == pytest.approx(list(found.box))
    assert (rec["id_sim"], rec["id_dist"], rec["id_match"]) == (sim, dist, match)
