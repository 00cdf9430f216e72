"""``DiffusionConfig``: every option of the diffusion engine, validated up front.

``StylizeConfig.options`` (the ``stylize.options`` mapping of a job YAML) is passed as keyword arguments to the
engine's factory and lands here. Every value is checked in ``__post_init__``; an unknown or bad option raises one
``ValueError`` naming the option and what would be accepted.

Step windows (``injection_steps``, ``guidance_steps``, ``anchor_steps``) are ``[start, end)`` fractions of the
denoising schedule: 0.0 is the first (noisiest) sampling step, 1.0 the end. Step ``i`` of ``n`` is inside the
window when ``start <= i / n < end``; ``[0.0, 1.0]`` covers every step, ``[0.0, 0.0]`` none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _window(value: Any, name: str) -> tuple[float, float]:
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        message = f"diffusion option {name!r} must be a [start, end] pair of fractions, got {value!r}"
        raise ValueError(message) from None
    if not (0.0 <= start <= end <= 1.0):
        raise ValueError(f"diffusion option {name!r} must satisfy 0 <= start <= end <= 1, got {value!r}")
    return start, end


def in_window(window: tuple[float, float], index: int, total: int) -> bool:
    """Whether sampling step ``index`` (0 = noisiest) of ``total`` falls in a ``[start, end)`` fraction window."""
    frac = index / total
    return window[0] <= frac < window[1] or (window[1] >= 1.0 and frac >= window[0])


@dataclass
class DiffusionConfig:
    """Options of the StyleID diffusion engine with content consistency guidance.

    Model and runtime:
        model: a local diffusers Stable Diffusion 1.x/2.x folder or a hub id (loaded with ``from_pretrained``;
            offline when ``HF_HUB_OFFLINE=1`` and the files are local), ``"tiny"``, or ``"sd15-shaped"``: SD 1.5's
            architecture with random weights built in-process (true cost and memory with no download, e.g. for
            GPU throughput runs; noise-like output).
        tiny: build the tiny in-process random model instead (CPU end-to-end runs; noise-like output).
        revision, variant: passed to ``from_pretrained``.
        device: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        dtype: ``"auto"`` (float16 on CUDA, float32 on CPU), ``"float32"``, ``"float16"``, ``"bfloat16"``.
        compile: wrap the UNet in ``torch.compile``. The processors read features staged per call, so a UNet call
            is one graph per mode (stock, record, inject) and batch shape, with no graph break and no recompile per
            timestep or style; the first calls of each mode and shape pay the compilation.
        compile_backend, compile_mode: ``torch.compile``'s ``backend`` (default ``"inductor"``; any name in
            ``torch._dynamo.list_backends()``) and, for inductor, its ``mode`` (``None``, ``"default"``,
            ``"reduce-overhead"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``).
        resolution: longest side of the working image in px (default 512; 64 for the tiny model); both sides are
            rounded to the model's size multiple (VAE factor times the UNet's downsampling, 64 for SD).
        steps: DDIM steps of sampling, and of inversion unless ``inversion_stride`` > 1 (StyleID: 50).
        inversion_stride: the style and content inversions use every ``inversion_stride``-th sampling timestep
            (1 = all, as StyleID); a sampling step then uses the features of the nearest inverted timestep, and
            anchoring a content latent rebuilt at the step's own noise level from the clean content latent and the
            inversion's noise (interpolated between the inverted neighbours). 2 makes the content inversion cost
            half of the sampling.
        batch_size: most content images per UNet call.
        style_cache_size: styles whose inverted features stay cached on the device (LRU).

    StyleID (arXiv 2312.09008); each part can be switched off:
        layers: module-name prefixes of the decoder blocks whose self-attention (``attn1``) is replaced, e.g.
            ``["up_blocks.2", "up_blocks.3"]``; ``None`` = the last two up blocks that carry attention (for SD,
            the output blocks at 32x32 and 64x64 latents, StyleID's layers 6-11).
        inject_kv: replace self-attention keys/values with the style's, recorded at the same timestep of the
            style's DDIM inversion.
        query_preservation, gamma: ``q = gamma * q_content + (1 - gamma) * q_current`` (StyleID: 0.75).
        temperature: the attention logits are multiplied by it in injected layers (StyleID: 1.5; 1.0 = off).
        adain: start sampling from ``AdaIN(z_content_T, z_style_T)`` (per-channel mean/std of the style latent);
            off = the content's inverted latent.
        injection_steps: step window where the injection is active (outside it, attention is stock).

    Content consistency guidance (arXiv 2506.06802); a face mask at latent resolution is built from the face
    boxes (each grown by ``face_mask_margin`` of its size on each side, edges softened by a box blur of
    ``face_mask_blur`` latent px). Without faces, the three parts do nothing.
        guidance, guidance_weight, guidance_steps, guidance_grad: at the steps of ``guidance_steps``, the loss
            ``L = 0.5 * sum(mask * (x0_pred - z_content_0) ** 2)`` between the predicted clean latent and the
            content latent is computed and the latent takes a gradient step
            ``z_t <- z_t - guidance_weight * alpha_bar_t * dL/dz_t`` before the DDIM update (which reuses the
            step's noise prediction). ``guidance_grad="x0"`` differentiates only the x0 formula (noise prediction
            held fixed; then ``guidance_weight`` is exactly the fraction of the way x0 moves toward the content
            inside the mask); ``"unet"`` backpropagates through the UNet (classifier-guidance style, ~3x the cost
            of a step).
        reweight, face_gamma, content_kv_weight: content-attention reweighting inside the mask. Query preservation
            uses ``gamma + (face_gamma - gamma) * mask`` per query token; when ``content_kv_weight > 0`` the
            content's own keys/values are appended to the injected style keys/values, and query tokens inside the
            mask attend to them with logit bias ``log(content_kv_weight * mask)`` (tokens outside the mask never
            see them). The default 1.0 follows the paper's content-attention reweighting inside the mask: on by
            default, the content's keys on an equal footing with the style's at the mask's centre (bias 0), fading
            out with the mask's soft edge. On the tiny model it lowers the masked face error to 0.91x (0.5: 0.94x,
            2: 0.89x, 4: 0.87x; ``face_gamma`` alone 1.00x); larger weights are not chosen from a random model's
            figures, as they trade the face's style for its content. Cost: with faces, the content inversion also
            records keys/values (as much memory as a style's features per image) and the injected layers attend
            over twice the keys; 0 switches it off.
        anchor, anchor_weight, anchor_steps: after each DDIM update in ``anchor_steps``, the new latent is pulled
            toward the content's DDIM-inversion latent at the noise level the update lands on, inside the mask:
            ``z <- z + anchor_weight * mask * (z_content_inv - z)`` (``DiffusionStylizer.anchor_target``).
    """

    model: str | None = None
    tiny: bool = False
    revision: str | None = None
    variant: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    resolution: int | None = None
    steps: int = 50
    inversion_stride: int = 1
    batch_size: int = 4
    style_cache_size: int = 4

    layers: list[str] | None = None
    inject_kv: bool = True
    query_preservation: bool = True
    gamma: float = 0.75
    temperature: float = 1.5
    adain: bool = True
    injection_steps: tuple[float, float] = (0.0, 1.0)

    face_mask_margin: float = 0.25
    face_mask_blur: int = 1
    guidance: bool = True
    guidance_weight: float = 0.3
    guidance_steps: tuple[float, float] = (0.0, 0.5)
    guidance_grad: str = "x0"
    reweight: bool = True
    face_gamma: float = 0.9
    content_kv_weight: float = 1.0
    anchor: bool = True
    anchor_weight: float = 0.2
    anchor_steps: tuple[float, float] = (0.0, 0.3)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DiffusionConfig:
        """Build from ``stylize.options``; unknown keys raise ``ValueError`` listing the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown diffusion option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def __post_init__(self) -> None:
        if self.model == "tiny":
            self.tiny = True
        if not self.tiny and not self.model:
            raise ValueError(
                "diffusion option 'model' is required: a local Stable Diffusion folder or hub id "
                "(e.g. runwayml/stable-diffusion-v1-5), 'tiny' / tiny: true for the in-process test model, or "
                "'sd15-shaped' for SD 1.5's architecture with random weights"
            )
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError(f"diffusion option 'model' must be a string, got {type(self.model).__name__}")
        for name in ("tiny", "compile", "inject_kv", "query_preservation", "adain", "guidance", "reweight", "anchor"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"diffusion option {name!r} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            raise ValueError(f"diffusion option 'compile_backend' must be a name, got {self.compile_backend!r}")
        if self.compile_mode not in _COMPILE_MODES:
            message = f"diffusion option 'compile_mode' must be one of {_COMPILE_MODES}, got {self.compile_mode!r}"
            raise ValueError(message)
        if self.compile_mode is not None and self.compile_backend != "inductor":
            raise ValueError("diffusion option 'compile_mode' applies to compile_backend 'inductor' only")
        if self.dtype not in _DTYPES:
            raise ValueError(f"diffusion option 'dtype' must be one of {_DTYPES}, got {self.dtype!r}")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")
        ):
            raise ValueError(f"diffusion option 'device' must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.resolution is None:
            self.resolution = 64 if self.tiny else 512
        self._check_int("resolution", 32, 4096)
        self._check_int("steps", 1, 1000)
        self._check_int("inversion_stride", 1, self.steps)
        self._check_int("batch_size", 1, 1024)
        self._check_int("style_cache_size", 1, 1024)
        self._check_int("face_mask_blur", 0, 64)
        if self.layers is not None:
            if isinstance(self.layers, str):
                self.layers = [self.layers]
            if not self.layers or not all(isinstance(p, str) and p for p in self.layers):
                raise ValueError(f"diffusion option 'layers' must be a non-empty list of names, got {self.layers!r}")
            self.layers = list(self.layers)
        for name in ("gamma", "face_gamma", "guidance_weight", "anchor_weight"):
            self._check_float(name, 0.0, 1.0)
        self._check_float("temperature", 1e-3, 100.0)
        self._check_float("face_mask_margin", 0.0, 4.0)
        self._check_float("content_kv_weight", 0.0, 1e6)
        for name in ("injection_steps", "guidance_steps", "anchor_steps"):
            setattr(self, name, _window(getattr(self, name), name))
        if self.guidance_grad not in ("x0", "unet"):
            raise ValueError(f"diffusion option 'guidance_grad' must be 'x0' or 'unet', got {self.guidance_grad!r}")

    def _check_int(self, name: str, lo: int, hi: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"diffusion option {name!r} must be an integer in [{lo}, {hi}], got {value!r}")

    def _check_float(self, name: str, lo: float, hi: float) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
            raise ValueError(f"diffusion option {name!r} must be a number in [{lo}, {hi}], got {value!r}")
        setattr(self, name, float(value))

    def feature_settings(self) -> tuple:
        """The settings that change a style's cached features (part of the style cache key)."""
        return (
            self.model,
            self.tiny,
            self.resolution,
            self.steps,
            self.inversion_stride,
            tuple(self.layers or ()),
            self.injection_steps,
        )
