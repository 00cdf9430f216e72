"""The insightface backend, on tiny ONNX models built here with buffalo_l's layout (no real weights, no network).

The detector is an SCRFD-layout graph (9 outputs: scores, boxes and keypoints for strides 8/16/32 with 2 anchors)
whose stride-32 score fires on every 32x32 input cell that is bright (mean above 191.5), and regresses a fixed box and
fixed keypoints around that cell: a 64 px box centred on the cell, with the five keypoints where the ArcFace template
puts them in that box. So a test paints bright cells and knows exactly where the faces must come out.
The recognizer is a random 112x112 -> 512 convnet.
"""

from __future__ import annotations

import re
import shutil
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("insightface")
onnxruntime = pytest.importorskip("onnxruntime")

from stylid_core.config import FacesConfig  # noqa: E402
from stylid_core.faces import create_face_analyzer  # noqa: E402
from stylid_core.faces.base import cosine_similarity  # noqa: E402
from stylid_core.faces.insightface_backend import InsightFaceAnalyzer, resolve_model_dir  # noqa: E402

CELL = 32  # the stride whose anchors fire
# ArcFace's 5-point template in its 112 px crop (insightface.utils.face_align.arcface_dst)
ARCFACE_DST = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# regression targets, in stride units from the anchor centre (SCRFD's anchor centre is the cell's top-left corner)
BOX_DIST = np.array([0.5, 0.5, 1.5, 1.5], dtype=np.float32)  # left, top, right, bottom: 64 px box on the cell centre
KPS_OFFSETS = -0.5 + 2.0 * ARCFACE_DST / 112.0  # (5, 2): the template stretched over that box


class TinySCRFD(torch.nn.Module):
    """SCRFD's 9-output layout (as in buffalo_l's det_10g.onnx): rank-2 outputs, scores x3, boxes x3, kps x3."""

    def __init__(self):
        super().__init__()
        self.register_buffer("box_dist", torch.from_numpy(BOX_DIST).view(1, 4))
        self.register_buffer("kps_offsets", torch.from_numpy(KPS_OFFSETS).reshape(1, 10))

    def forward(self, x):
        gray = x.mean(dim=1, keepdim=True)  # (1, 1, H, W), pixels normalised to about [-1, 1]
        scores, boxes, kpss = [], [], []
        for stride in (8, 16, 32):
            f = torch.nn.functional.avg_pool2d(gray, stride, stride)[0, 0]  # (H/s, W/s)
            fire = torch.sigmoid(20.0 * (f - 0.5)) if stride == CELL else torch.zeros_like(f)
            # 2 anchors per location, location-major (y, then x), as SCRFD lays out its anchor centres
            score = torch.stack([fire, torch.zeros_like(fire)], dim=-1).reshape(-1, 1)
            zeros = score * 0.0
            scores.append(score)
            boxes.append(zeros + self.box_dist)
            kpss.append(zeros + self.kps_offsets)
        return (*scores, *boxes, *kpss)


class TinyArcFace(torch.nn.Module):
    """A random 112x112 -> 512 recognizer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 512)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _export_models(folder: Path, dynamic: bool = True) -> None:
    """det_10g.onnx (input 1x3xHxW, or fixed 1x3x640x640) and w600k_r50.onnx (input Bx3x112x112, or fixed B=1)."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        _export_onnx(folder, dynamic)


def _export_onnx(folder: Path, dynamic: bool) -> None:
    torch.manual_seed(0)
    out_names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(
        TinySCRFD(),
        (torch.zeros(1, 3, 640, 640),),
        str(folder / "det_10g.onnx"),
        input_names=["input.1"],
        output_names=out_names,
        dynamic_axes={"input.1": {2: "height", 3: "width"}, **{n: {0: "anchors"} for n in out_names}}
        if dynamic
        else None,
        dynamo=False,
    )
    torch.onnx.export(
        TinyArcFace().eval(),
        (torch.zeros(1, 3, 112, 112),),
        str(folder / "w600k_r50.onnx"),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}} if dynamic else None,
        dynamo=False,
    )


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A buffalo_l-style folder: ``<root>/models/buffalo_l/{det_10g,w600k_r50}.onnx``."""
    folder = tmp_path_factory.mktemp("insightface_root") / "models" / "buffalo_l"
    _export_models(folder)
    return folder


@pytest.fixture(scope="session")
def analyzer(model_dir) -> InsightFaceAnalyzer:
    return InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(model_dir)))


def _paint(image: np.ndarray, x: int, y: int, size: int = CELL, seed: int | None = None) -> None:
    """A bright square (a "face" to the tiny detector), textured when ``seed`` is given."""
    if seed is None:
        image[y : y + size, x : x + size] = 255
    else:
        # high-contrast texture whose mean (about 217) still makes the tiny detector fire
        rng = np.random.default_rng(seed)
        texture = np.where(rng.random((size, size, 3)) < 0.8, 255, 64)
        image[y : y + size, x : x + size] = texture.astype(np.uint8)


def _expected(cell_x: float, cell_y: float, cell: float = CELL) -> tuple[np.ndarray, np.ndarray]:
    """The box and keypoints the detector regresses for a bright cell with top-left (cell_x, cell_y) of side cell."""
    box = np.array([cell_x - 0.5 * cell, cell_y - 0.5 * cell, cell_x + 1.5 * cell, cell_y + 1.5 * cell])
    kps = np.array([cell_x, cell_y]) + KPS_OFFSETS * cell
    return box, kps


def test_model_dir_loads_through_face_analysis_roles(analyzer, model_dir):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert analyzer.model_dir == model_dir.resolve()
    assert set(analyzer._app.models) == {"detection", "recognition"}
    assert isinstance(analyzer._app.models["detection"], SCRFD) and analyzer._app.models["detection"].use_kps
    assert isinstance(analyzer._app.models["recognition"], ArcFaceONNX)
    assert analyzer.name == "insightface" and analyzer.distance_kind == "cosine"
    assert analyzer.embedding_dim == 512 and 0 < analyzer.match_threshold < 1
    assert analyzer.session_providers["detection"][0] == "CPUExecutionProvider"

    # the same folder named the insightface way: a model name under <root>/models
    root = model_dir.parent.parent
    by_name = InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir="buffalo_l", root=str(root)))
    assert by_name.model_dir == model_dir.resolve()
    assert resolve_model_dir(None, str(root)) == model_dir.resolve()  # buffalo_l is the default name


def test_detect_box_and_keypoints_in_image_coordinates(analyzer):
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _paint(image, 5 * CELL, 3 * CELL)
    _paint(image, 12 * CELL, 10 * CELL)
    faces = analyzer.detect(image)
    assert len(faces) == 2
    got = sorted(faces, key=lambda f: f.box[0])
    for face, (cx, cy) in zip(got, [(5 * CELL, 3 * CELL), (12 * CELL, 10 * CELL)]):
        box, kps = _expected(cx, cy)
        np.testing.assert_allclose(face.box, box, atol=1e-3)
        np.testing.assert_allclose(face.keypoints, kps, atol=1e-3)
        assert face.keypoints.shape == (5, 2) and face.keypoints.dtype == np.float32
        assert face.score > 0.99 and face.embedding is None
        assert face.size_px == pytest.approx(64.0)


@pytest.mark.parametrize(
    ("shape", "max_detect_side", "scale"),
    [
        ((960, 1920), 640, 3),  # our downscale (1/3) before detection
        ((1280, 1280), 1600, 2),  # no downscale by us; SCRFD's own resize to det_size 640 (1/2)
        ((1280, 1280), 960, 2),  # both: 1280 -> 960 here, then 960 -> 640 inside SCRFD
    ],
)
def test_detect_scales_back_to_original_coordinates(model_dir, shape, max_detect_side, scale):
    analyzer = InsightFaceAnalyzer(
        FacesConfig(backend="insightface", model_dir=str(model_dir), max_detect_side=max_detect_side)
    )
    image = np.zeros((*shape, 3), dtype=np.uint8)
    cell = CELL * scale  # a patch that becomes one 32 px detector cell after all resizing
    _paint(image, 7 * cell, 4 * cell, size=cell)
    faces = analyzer.detect(image)
    assert len(faces) == 1
    box, kps = _expected(7 * cell, 4 * cell, cell=cell)
    np.testing.assert_allclose(faces[0].box, box, atol=0.5)
    np.testing.assert_allclose(faces[0].keypoints, kps, atol=0.5)


def test_fixed_shape_models(tmp_path):
    """A detector fixed at 640x640 ignores det_size; a recognizer fixed at batch 1 is called once per face."""
    folder = tmp_path / "fixed"
    _export_models(folder, dynamic=False)
    analyzer = InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(folder), det_size=320))
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _paint(image, 5 * CELL, 3 * CELL, seed=1)
    _paint(image, 12 * CELL, 10 * CELL, seed=1)
    faces = sorted(analyzer.detect(image), key=lambda f: f.box[0])
    assert len(faces) == 2
    np.testing.assert_allclose(faces[0].box, _expected(5 * CELL, 3 * CELL)[0], atol=1e-3)
    assert analyzer._detector.input_size == (640, 640) and not analyzer._recognizer_batches
    embs = analyzer.embed(image, [f.keypoints for f in faces])
    assert embs.shape == (2, 512)
    assert cosine_similarity(embs[0], embs[1]) == pytest.approx(1.0, abs=1e-4)


def test_faces_at_image_borders_are_clipped_and_embeddable(analyzer):
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _paint(image, 0, 0, seed=1)  # top-left corner: raw box (-16, -16, 48, 48)
    _paint(image, 640 - CELL, 480 - CELL, seed=2)  # bottom-right corner
    faces = sorted(analyzer.detect(image), key=lambda f: f.box[0])
    assert len(faces) == 2
    np.testing.assert_allclose(faces[0].box, (0, 0, 48, 48), atol=1e-3)
    np.testing.assert_allclose(faces[1].box, (640 - 48, 480 - 48, 640, 480), atol=1e-3)
    # keypoints stay where the detector put them (alignment needs them unclipped)
    np.testing.assert_allclose(faces[0].keypoints, _expected(0, 0)[1], atol=1e-3)
    embs = analyzer.embed(image, [f.keypoints for f in faces])
    assert embs.shape == (2, 512) and np.isfinite(embs).all()


def test_no_face(analyzer):
    image = np.zeros((200, 300, 3), dtype=np.uint8)
    image[50:150, 100:200] = 150  # mid-grey, under the detector's firing level
    assert analyzer.detect(image) == []
    assert analyzer.analyze(image) == []
    empty = analyzer.embed(image, [])
    assert empty.shape == (0, 512) and empty.dtype == np.float32


def test_config_limits_min_face_px_max_faces_det_thresh(model_dir):
    image = np.zeros((640, 640, 3), dtype=np.uint8)
    for i in range(3):
        _paint(image, (2 + 5 * i) * CELL, 8 * CELL)

    def detect(**overrides):
        return InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(model_dir), **overrides)).detect(
            image
        )

    assert len(detect()) == 3
    assert len(detect(max_faces=2)) == 2
    assert detect(min_face_px=65) == []  # the boxes are 64 px
    assert detect(det_thresh=0.99999) == []  # the tiny detector scores 0.99995


def test_embed_is_one_batched_call_of_unit_vectors(analyzer):
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _paint(image, 2 * CELL, 2 * CELL, seed=1)
    _paint(image, 9 * CELL, 6 * CELL, seed=1)  # the same face, elsewhere
    _paint(image, 14 * CELL, 10 * CELL, seed=2)  # another face
    faces = sorted(analyzer.detect(image), key=lambda f: f.box[0])
    assert len(faces) == 3

    session = analyzer._recognizer.session
    calls = []

    class CountingSession:
        def run(self, output_names, feeds):
            calls.append(next(iter(feeds.values())).shape)
            return session.run(output_names, feeds)

    analyzer._recognizer.session = CountingSession()
    try:
        keypoints = [f.keypoints for f in faces] + [faces[0].keypoints]
        embs = analyzer.embed(image, keypoints)
    finally:
        analyzer._recognizer.session = session
    assert calls == [(4, 3, 112, 112)]
    assert embs.shape == (4, 512) and embs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-5)
    assert cosine_similarity(embs[0], embs[3]) == pytest.approx(1.0, abs=1e-6)  # same face, embedded twice
    assert cosine_similarity(embs[0], embs[1]) == pytest.approx(1.0, abs=1e-4)  # same face, moved: aligned alike
    assert cosine_similarity(embs[0], embs[2]) < 0.98  # another face (about 0.91 here)
    assert analyzer.distance(embs[0], embs[3]) == pytest.approx(0.0, abs=1e-6)

    # a batch of N equals N batches of 1
    singles = np.concatenate([analyzer.embed(image, [k]) for k in keypoints])
    np.testing.assert_allclose(singles, embs, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*estimate.* is deprecated:FutureWarning")
def test_matches_insightface_own_pipeline(analyzer):
    """detect + embed on an RGB image give what FaceAnalysis.get gives on the same image in BGR."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 120, size=(480, 640, 3), dtype=np.uint8)  # dark noise: no detection
    _paint(image, 4 * CELL, 5 * CELL, seed=4)
    image[5 * CELL : 6 * CELL, 4 * CELL : 5 * CELL, 0] = 200  # colour matters: RGB/BGR mix-ups would show
    faces = analyzer.analyze(image)
    reference = analyzer._app.get(np.ascontiguousarray(image[:, :, ::-1]))
    assert len(faces) == len(reference) == 1
    np.testing.assert_allclose(faces[0].box, reference[0].bbox, atol=1e-3)
    np.testing.assert_allclose(faces[0].keypoints, reference[0].kps, atol=1e-3)
    np.testing.assert_allclose(faces[0].embedding, reference[0].normed_embedding, atol=1e-5)
    swapped = analyzer.embed(np.ascontiguousarray(image[:, :, ::-1]), [faces[0].keypoints])[0]
    assert cosine_similarity(swapped, faces[0].embedding) < 0.9999


def test_gray_and_rgba_images(analyzer):
    rgb = np.zeros((640, 640, 3), dtype=np.uint8)
    _paint(rgb, 3 * CELL, 3 * CELL)
    rgba = np.concatenate([rgb, np.full((640, 640, 1), 255, dtype=np.uint8)], axis=2)
    assert len(analyzer.detect(rgb[:, :, 0])) == 1
    assert len(analyzer.detect(rgba)) == 1
    with pytest.raises(ValueError, match="shape"):
        analyzer.embed(rgb, [np.zeros((4, 2))])


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt (insightface's or a raw socket connection) fails the test."""
    import insightface.utils.storage as storage

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(storage, "download", refuse)
    monkeypatch.setattr(storage, "download_onnx", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_or_bad_model_dir_raises_value_error_without_download(tmp_path, model_dir, no_network):
    missing = tmp_path / "nowhere" / "buffalo_l"
    with pytest.raises(ValueError, match=re.escape(str(missing)) + ".*does not exist.*model_dir"):
        InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(missing)))
    # the insightface way of naming a model: <root>/models/buffalo_l is missing, and is named in the message
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "models" / "buffalo_l")) + ".*does not exist"):
        create_face_analyzer(FacesConfig(backend="insightface", model_dir="buffalo_l", root=str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .onnx"):
        InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(empty)))
    only_rec = tmp_path / "only_rec"
    only_rec.mkdir()
    shutil.copy(model_dir / "w600k_r50.onnx", only_rec)
    with pytest.raises(ValueError, match="no SCRFD detector"):
        InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(only_rec)))
    only_det = tmp_path / "only_det"
    only_det.mkdir()
    shutil.copy(model_dir / "det_10g.onnx", only_det)
    with pytest.raises(ValueError, match="no ArcFace recognizer"):
        InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(only_det)))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "det_10g.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="cannot load the insightface models in " + re.escape(repr(str(corrupt)))):
        InsightFaceAnalyzer(FacesConfig(backend="insightface", model_dir=str(corrupt)))


def test_unavailable_providers_raise(model_dir):
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        InsightFaceAnalyzer(
            FacesConfig(backend="insightface", model_dir=str(model_dir), providers=["NoSuchExecutionProvider"])
        )


def test_factory_builds_the_backend(model_dir):
    analyzer = create_face_analyzer(FacesConfig(backend="insightface", model_dir=str(model_dir)))
    assert isinstance(analyzer, InsightFaceAnalyzer)
    image = np.zeros((640, 640, 3), dtype=np.uint8)
    _paint(image, 4 * CELL, 4 * CELL, seed=5)
    faces = analyzer.analyze(image)
    assert len(faces) == 1 and faces[0].embedding.shape == (512,)
    restored = type(faces[0]).from_dict(faces[0].to_dict())
    assert analyzer.distance(restored.embedding, faces[0].embedding) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(),
    reason="onnxruntime has no CUDAExecutionProvider here",
)
def test_cuda_provider_matches_cpu(model_dir, analyzer):
    gpu = InsightFaceAnalyzer(
        FacesConfig(
            backend="insightface",
            model_dir=str(model_dir),
            providers=["CUDAExecutionProvider", "CPUExecutionProvider"],
        )
    )
    assert gpu.session_providers["detection"][0] == "CUDAExecutionProvider"
    assert gpu.session_providers["recognition"][0] == "CUDAExecutionProvider"
    image = np.zeros((480, 640, 3), dtype=np.uint8)
    _paint(image, 5 * CELL, 3 * CELL, seed=6)
    _paint(image, 12 * CELL, 10 * CELL, seed=7)
    on_gpu = sorted(gpu.analyze(image), key=lambda f: f.box[0])
    on_cpu = sorted(analyzer.analyze(image), key=lambda f: f.box[0])
    assert len(on_gpu) == len(on_cpu) == 2
    for g, c in zip(on_gpu, on_cpu):
        np.testing.assert_allclose(g.box, c.box, atol=1e-2)
        assert cosine_similarity(g.embedding, c.embedding) > 0.999
