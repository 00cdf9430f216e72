"""Typed configs of the FaceSnap modules, their inference backend and their training job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stylid_core.config import ConfigError, _check


@dataclass
class FaceSnapModelConfig:
    """Shapes of the trainable FaceSnap modules (saved beside their weights as JSON).

    ``clip_dim`` is the hidden size of the CLIP vision encoder whose patch tokens feed the mixer,
    ``face_embed_dim`` the face-recognition embedding size (128 dlib, 512 ArcFace), ``cross_attention_dim`` the
    UNet's text-embedding width; the identity tokens have that width so the UNet and the ControlNet branch can
    attend over them.
    """

    clip_dim: int = 1024
    face_embed_dim: int = 512
    cross_attention_dim: int = 768
    num_tokens: int = 16  # identity tokens the mixer emits
    mixer_dim: int = 768
    mixer_depth: int = 4
    mixer_heads: int = 12
    num_landmarks: int = 68
    predictor_hidden: int = 512
    predictor_depth: int = 3
    landmark_channels: int = 5  # landmark map channels: 68 points grouped into jaw, brows, nose, eyes, mouth
    landmark_sigma: float = 1.0  # Gaussian radius of a rendered landmark, in latent pixels
    use_controlnet: bool = True
    # ControlNet conditioning encoder widths; each entry after the first halves the map once
    controlnet_embedding_channels: tuple[int, ...] = (16,)

    def __post_init__(self) -> None:
        self.controlnet_embedding_channels = tuple(int(c) for c in self.controlnet_embedding_channels)
        for name in ("clip_dim", "face_embed_dim", "cross_attention_dim", "num_tokens", "mixer_dim"):
            _check(getattr(self, name) >= 1, f"facesnap.model.{name} must be >= 1")
        _check(self.mixer_depth >= 1 and self.predictor_depth >= 1, "facesnap.model depths must be >= 1")
        _check(
            self.mixer_dim % self.mixer_heads == 0,
            f"facesnap.model.mixer_dim ({self.mixer_dim}) must be a multiple of mixer_heads ({self.mixer_heads})",
        )
        _check(self.num_landmarks in (5, 68), f"facesnap.model.num_landmarks must be 5 or 68: {self.num_landmarks}")
        _check(self.landmark_channels in (1, 5), "facesnap.model.landmark_channels must be 1 or 5")
        _check(self.landmark_sigma > 0, "facesnap.model.landmark_sigma must be > 0")
        _check(len(self.controlnet_embedding_channels) >= 1, "controlnet_embedding_channels must not be empty")

    @property
    def landmark_map_upscale(self) -> int:
        """Landmark maps are drawn at latent size times this, so the conditioning encoder lands on the latent grid."""
        return 2 ** (len(self.controlnet_embedding_channels) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["controlnet_embedding_channels"] = list(self.controlnet_embedding_channels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceSnapModelConfig:
        return build_config(cls, data, "facesnap.model")


@dataclass
class TinyComponentsConfig:
    """Sizes of the tiny in-process Stable Diffusion + CLIP vision components used by tests and CPU smoke runs."""

    sample_size: int = 32  # image px (the tiny VAE downsamples by 2)
    block_out_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    vision_hidden: int = 32
    vision_image_size: int = 32
    vision_patch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        _check(self.sample_size % 4 == 0, "tiny.sample_size must be a multiple of 4")
        _check(self.vision_image_size % self.vision_patch == 0, "tiny.vision_image_size must divide by vision_patch")


@dataclass
class FaceSnapConfig:
    """The ``facesnap`` customizer backend: base model, trained modules and sampling settings.

    With ``tiny`` set, every component is built in-process with random weights (tests, CPU smoke runs);
    otherwise ``base_model`` (a diffusers SD 1.x folder or hub id) and ``image_encoder`` (a CLIPVisionModel
    folder or hub id) are loaded, and ``checkpoint`` (a folder written by ``save_facesnap``) gives the modules.
    """

    base_model: str | None = None
    image_encoder: str | None = None
    checkpoint: str | None = None
    tiny: TinyComponentsConfig | None = None
    model: FaceSnapModelConfig | None = None  # only used when no checkpoint is given (untrained modules)
    resolution: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    identity_scale: float = 1.0  # scale of the identity cross-attention
    landmark_scale: float = 1.0  # ControlNet conditioning scale; 0 disables the landmark branch
    # fraction of the denoising steps, from the first, on which the landmark branch runs (diffusers'
    # ``control_guidance_end``); it is not computed at all on the rest; 1.0: every step. The pose and layout are
    # set in the early, high-noise steps, while the branch costs ~35-50% of a UNet call per step, so 0.4 keeps
    # the whole stage under 1.3x plain SD even at the top of that range (README's benchmark section).
    landmark_steps_end: float = 0.4
    scheduler: str = "ddim"  # ddim | euler | dpm
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | float32 | float16 | bfloat16
    max_batch: int = 4  # images generated per UNet batch
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = build_config(TinyComponentsConfig, self.tiny, "facesnap.tiny")
        if isinstance(self.model, dict):
            self.model = FaceSnapModelConfig.from_dict(self.model)
        _check(
            self.tiny is not None or self.base_model is not None,
            "facesnap needs base_model (a diffusers SD 1.x folder or hub id) or tiny settings",
        )
        _check(self.resolution % 8 == 0 and self.resolution >= 16, "facesnap.resolution must be a multiple of 8")
        _check(self.num_inference_steps >= 1, "facesnap.num_inference_steps must be >= 1")
        _check(self.guidance_scale >= 0, "facesnap.guidance_scale must be >= 0")
        _check(self.identity_scale >= 0 and self.landmark_scale >= 0, "facesnap scales must be >= 0")
        _check(0 <= self.landmark_steps_end <= 1, "facesnap.landmark_steps_end must be in [0, 1]")
        _check(self.scheduler in ("ddim", "euler", "dpm"), f"facesnap.scheduler unknown: {self.scheduler!r}")
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"), f"facesnap.dtype unknown: {self.dtype!r}")
        _check(self.max_batch >= 1, "facesnap.max_batch must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceSnapConfig:
        return build_config(cls, data, "facesnap")


def build_config(cls: type, data: dict[str, Any] | None, where: str):
    """``cls(**data)`` with unknown keys and bad types reported as one ``ConfigError`` naming ``where``."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) in {where}: {', '.join(unknown)}; known: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None
