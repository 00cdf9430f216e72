"""``DiffusionStylizer``: StyleID with in-memory style features and content consistency guidance.

Flow for a group of content images sharing one style and one working size (``stylize_batch`` groups them):

1. the style is resized to its working size, VAE-encoded and DDIM-inverted once while every injected
   self-attention layer records its keys/values per timestep; those features stay on the device in an LRU cache
   keyed by a hash of the style pixels and the feature settings, and serve every later content image;
2. the contents are encoded and DDIM-inverted together (one UNet call per step for the whole group), recording
   their queries (and keys/values when content-attention mixing is on) and keeping their latent trajectory;
3. sampling starts from ``AdaIN(z_content_T, z_style_T)``; at each step the processors inject the style's
   keys/values with query preservation and temperature, and the face mask drives the three consistency parts
   (latent guidance, attention reweighting, anchoring), see ``DiffusionConfig``;
4. the latents are decoded and resized back to each content's size.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stylid_core.faces.base import Face
from stylid_core.stylize.base import Stylizer
from stylid_core.stylize.diffusion.config import DiffusionConfig, in_window
from stylid_core.stylize.diffusion.inversion import DDIMSchedule, ddim_invert, ddim_move
from stylid_core.stylize.diffusion.processors import (
    Features,
    InjectionState,
    default_layers,
    install_processors,
    select_layers,
)
from stylid_core.stylize.diffusion.sd_shaped import SD15_SHAPED, SD15_SHAPED_MODEL_NAME, build_sd15_shaped_components
from stylid_core.stylize.diffusion.tiny import TINY_MODEL_NAME, DiffusionComponents, build_tiny_components

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StyleFeatures:
    """A style's inverted self-attention keys/values per layer and timestep, and its inverted latent z_T."""

    key: str
    k: Features
    v: Features
    z_T: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = [t for feats in (self.k, self.v) for per_t in feats.values() for t in per_t.values()]
        return int(sum(t.numel() * t.element_size() for t in tensors))


class StyleFeatureCache:
    """A bounded LRU of ``StyleFeatures`` kept on the device."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StyleFeatures] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> StyleFeatures | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, item: StyleFeatures) -> None:
        self._items[item.key] = item
        self._items.move_to_end(item.key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


@dataclass
class ContentPass:
    """What the content inversion leaves for sampling: recorded features and the latent trajectory."""

    q: Features | None
    k: Features | None
    v: Features | None
    trajectory: dict[int, torch.Tensor]  # t -> (B, C, h, w); -1 -> clean latent


def _as_rgb(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{what} must be an RGB image (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {image.dtype}")
    return np.ascontiguousarray(image[:, :, :3])


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` in place to ``device`` and cast it to ``dtype``."""
    module = module.to(device)
    if module.dtype != dtype:
        # torch's own ``to``: diffusers' override warns about modules to keep in float32 even when there are none
        torch.nn.Module.to(module, dtype=dtype)
    return module


def resolve_device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """Torch device and dtype of the ``device``/``dtype`` options ("auto": CUDA in float16, else CPU in float32)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"diffusion option device={device!r} but CUDA is not available")
    torch_device = torch.device(device)
    if dtype == "auto":
        torch_dtype = torch.float16 if torch_device.type == "cuda" else torch.float32
    else:
        torch_dtype = _TORCH_DTYPES[dtype]
    if torch_device.type == "cpu" and torch_dtype == torch.float16:
        raise ValueError("diffusion option dtype='float16' is not supported on CPU; use float32 or bfloat16")
    return torch_device, torch_dtype


def load_components(cfg: DiffusionConfig, dtype: torch.dtype) -> DiffusionComponents:
    """Load a diffusers Stable Diffusion 1.x/2.x checkpoint (local folder or hub id) with ``from_pretrained``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    kwargs = {k: v for k, v in (("revision", cfg.revision), ("variant", cfg.variant)) if v is not None}
    model = cfg.model
    try:
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", torch_dtype=dtype, **kwargs)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype, **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype, **kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", revision=cfg.revision)
        scheduler = DDIMScheduler.from_pretrained(model, subfolder="scheduler", revision=cfg.revision)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load Stable Diffusion model {model!r} (a diffusers folder with unet/vae/text_encoder/tokenizer/"
            f"scheduler, or a hub id; with HF_HUB_OFFLINE=1 the files must be local): {exc}"
        ) from exc
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler)


class DiffusionStylizer(Stylizer):
    """StyleID (training-free style injection) with content consistency guidance for faces.

    Constructed from ``stylize.options`` (see ``DiffusionConfig`` for every option); raises ``ValueError`` for a
    bad option or a model that cannot be loaded. Not thread-safe: one instance per actor.

    ``components`` (benchmarks, tests): already-built ``DiffusionComponents`` to use instead of loading ``model``,
    which then only names them in reports. They are moved and cast in place, and the engine installs its
    processors on their UNet, so engines sharing components must reinstall their processors before each use
    (``unet.set_attn_processor``).
    """

    name = "diffusion"

    def __init__(self, components: DiffusionComponents | None = None, **options) -> None:
        cfg = self.config = DiffusionConfig.from_options(options)
        self.device, self.dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)

        if components is not None:
            parts = components
            self.model = TINY_MODEL_NAME if cfg.tiny else str(cfg.model)
        elif cfg.tiny:
            parts = build_tiny_components()
            self.model = TINY_MODEL_NAME
        elif cfg.model == SD15_SHAPED:
            parts = build_sd15_shaped_components()
            self.model = SD15_SHAPED_MODEL_NAME
        else:
            parts = load_components(cfg, self.dtype)
            self.model = str(cfg.model)
        self.unet = _place(parts.unet, self.device, self.dtype)
        self.vae = _place(parts.vae, self.device, self.dtype)
        self.latent_scale = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size_multiple = vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        with torch.no_grad():
            text_encoder = _place(parts.text_encoder, self.device, self.dtype)
            ids = parts.tokenizer(
                [""],
                padding="max_length",
                max_length=parts.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            self.empty_prompt = text_encoder(ids)[0].to(self.dtype)
        del text_encoder  # only the empty prompt is ever encoded
        self.schedule = DDIMSchedule.from_scheduler(parts.scheduler, cfg.steps)
        self.inversion_schedule = self.schedule.subsample(cfg.inversion_stride)
        self._plan_feature_timesteps()

        self.layers = select_layers(self.unet, cfg.layers or default_layers(self.unet))
        self.state = InjectionState(feature_dtype=self.dtype)
        self.processors = install_processors(self.unet, self.layers, self.state)
        self._unet = self.unet
        if cfg.compile:
            import torch._dynamo as dynamo

            backends = dynamo.list_backends(exclude_tags=())
            if cfg.compile_backend not in backends:
                raise ValueError(
                    f"diffusion option 'compile_backend' {cfg.compile_backend!r} is not a torch.compile backend; "
                    f"known: {backends}"
                )
            self._unet = torch.compile(self.unet, backend=cfg.compile_backend, mode=cfg.compile_mode)
        self.style_cache = StyleFeatureCache(cfg.style_cache_size)

    # ---- sizes and tensors -------------------------------------------------------------------------------------

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) of the working image: longest side ``resolution``, both sides multiples of ``size_multiple``."""
        scale = self.config.resolution / max(height, width)
        m = self.size_multiple
        return max(m, round(height * scale / m) * m), max(m, round(width * scale / m) * m)

    def _to_tensor(self, images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
        batch = []
        for image in images:
            # a read-only array (a decoded image, a view) is copied once: torch tensors must own writable memory
            pixels = torch.from_numpy(image if image.flags.writeable else image.copy())
            x = pixels.to(self.device).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            batch.append(x)
        return torch.cat(batch).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Clean latents (float32) of images in [-1, 1]."""
        dist = self.vae.encode(pixels.to(self.dtype)).latent_dist
        return dist.mean.float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32) of latents."""
        return self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample.float().clamp(-1, 1)

    def _unet_call(self, latents: torch.Tensor, t: int) -> torch.Tensor:
        """One UNet call with the processors' features staged before it and its recordings filed after it."""
        cond = self.empty_prompt.expand(latents.shape[0], -1, -1)
        # the timestep as a tensor: a compiled graph would specialize on a Python int (a recompile when it changes),
        # and diffusers would copy it to the device on every call
        timestep = torch.tensor(t, device=self.device)
        self.state.stage()
        try:
            out = self._unet(latents.to(self.dtype), timestep, encoder_hidden_states=cond).sample
            self.state.collect()
        finally:
            self.state.staged.clear()
            self.state.captured.clear()
        return out

    def face_mask(
        self, faces: list[list[Face]], content_sizes: list[tuple[int, int]], latent_hw
    ) -> torch.Tensor | None:
        """(B, 1, h, w) soft face mask at latent resolution from boxes in each content's pixel coordinates."""
        if not any(faces):
            return None
        h, w = latent_hw
        ys = torch.arange(h, device=self.device).float()[:, None] + 0.5
        xs = torch.arange(w, device=self.device).float()[None, :] + 0.5
        masks = []
        for image_faces, (ch, cw) in zip(faces, content_sizes):
            mask = torch.zeros(h, w, device=self.device)
            sy, sx = h / ch, w / cw
            for face in image_faces:
                x0, y0, x1, y1 = (float(v) for v in face.box)
                grow_x = (x1 - x0) * self.config.face_mask_margin
                grow_y = (y1 - y0) * self.config.face_mask_margin
                inside = (
                    (xs >= (x0 - grow_x) * sx)
                    & (xs <= (x1 + grow_x) * sx)
                    & (ys >= (y0 - grow_y) * sy)
                    & (ys <= (y1 + grow_y) * sy)
                )
                mask = torch.maximum(mask, inside.float())
            masks.append(mask)
        out = torch.stack(masks)[:, None]
        blur = self.config.face_mask_blur
        if blur > 0:
            out = F.avg_pool2d(out, 2 * blur + 1, stride=1, padding=blur, count_include_pad=False)
        return out.clamp(0, 1)

    # ---- the three passes ----------------------------------------------------------------------------------------

    def _injecting(self) -> bool:
        cfg = self.config
        return cfg.inject_kv or cfg.query_preservation or cfg.temperature != 1.0

    def _plan_feature_timesteps(self) -> None:
        """Which inverted timestep serves each sampling step (features; anchoring latent)."""
        cfg, n, stride = self.config, len(self.schedule), self.config.inversion_stride
        inverted = list(range(0, n, stride))  # sampling indices of the inverted timesteps
        self._recorded_indices = {i for i in inverted if in_window(cfg.injection_steps, i, n)}
        ts = self.schedule.timesteps
        self._feature_t: dict[int, int] = {}
        for i, t in enumerate(ts):
            if self._recorded_indices:
                self._feature_t[t] = ts[min(self._recorded_indices, key=lambda j: (abs(j - i), j))]
        # Anchoring after sampling step i needs the content latent at the level the step lands on, alpha_prev[i]
        # (sampling index i + 1). With stride 1 that is an inverted latent. Otherwise no inverted latent has that
        # level (the nearest is one stride noisier or cleaner, and pulling towards it adds or removes noise), so
        # the target is rebuilt at exactly that level, ddim_move(z_0, eps, alpha_prev[i]), from the clean content
        # latent and the inversion's noise eps_j = (z_j - sqrt(a_j) z_0) / sqrt(1 - a_j), interpolated linearly
        # between the inverted neighbours (only the cleaner side's past the last inverted one). At an inverted
        # level this gives z_j back exactly.
        self._anchor_noise: dict[int, list[tuple[int, float, float]]] = {}  # t -> [(t_j, a_j, weight)]
        alpha_of = dict(zip(ts, self.schedule.alpha_t))
        for i, t in enumerate(ts[:-1]):
            target = i + 1
            lo = max(j for j in inverted if j <= target)
            hi = min((j for j in inverted if j >= target), default=None)
            if hi is None or hi == lo:
                parts = [(lo, 1.0)]
            else:
                w = (target - lo) / (hi - lo)
                parts = [(lo, 1.0 - w), (hi, w)]
            self._anchor_noise[t] = [(ts[j], alpha_of[ts[j]], wj) for j, wj in parts if wj > 0]

    def guidance_gradient(
        self, x: torch.Tensor, index: int, mask: torch.Tensor, z_content: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's noise prediction and ``dL/dx`` of ``L = 0.5 * sum(mask * (x0_pred(x) - z_content) ** 2)``.

        ``guidance_grad="unet"`` backpropagates through the UNet's prediction; ``"x0"`` holds it fixed, which gives
        ``mask * (x0 - z_content) / sqrt(a_t)``.
        """
        schedule, t = self.schedule, self.schedule.timesteps[index]
        a_t = schedule.alpha_t[index]
        if self.config.guidance_grad == "unet":
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                eps, x0 = schedule.eps_and_x0(self._unet_call(x_in, t).float(), x_in, a_t)
                loss = 0.5 * (mask * (x0 - z_content) ** 2).sum()
                (grad,) = torch.autograd.grad(loss, x_in)
            return eps.detach(), grad
        with torch.no_grad():
            eps, x0 = schedule.eps_and_x0(self._unet_call(x, t).float(), x, a_t)
        return eps, mask * (x0 - z_content) / a_t**0.5

    def anchor_target(self, content: ContentPass, index: int) -> torch.Tensor:
        """The content latent at the noise level sampling step ``index`` lands on (the clean latent after the last)."""
        z_0 = content.trajectory[-1]
        if index + 1 >= len(self.schedule):
            return z_0
        eps = sum(
            w * (content.trajectory[t_j] - a_j**0.5 * z_0) / (1 - a_j) ** 0.5
            for t_j, a_j, w in self._anchor_noise[self.schedule.timesteps[index]]
        )
        return ddim_move(z_0, eps, self.schedule.alpha_prev[index])

    def _invert_recording(self, latents: torch.Tensor, keys: tuple[str, ...]):
        state = self.state

        def before_step(index: int, t: int) -> None:
            state.timestep = t
            sampling_index = index * self.config.inversion_stride
            state.mode = "record" if keys and sampling_index in self._recorded_indices else "off"

        state.reset_recording(keys)
        try:
            trajectory = ddim_invert(self._unet_call, latents, self.inversion_schedule, before_step)
            recorded = state.recorded
        finally:
            state.mode = "off"
            state.recorded = {}
        return trajectory, recorded

    @staticmethod
    def style_key(style: np.ndarray, settings: tuple) -> str:
        digest = hashlib.sha256()
        digest.update(repr((style.shape, settings)).encode())
        digest.update(np.ascontiguousarray(style).tobytes())
        return digest.hexdigest()

    def style_features(self, style: np.ndarray) -> StyleFeatures:
        """The style's inverted features, from the cache or computed (then cached)."""
        style = _as_rgb(style, "style")
        key = self.style_key(style, self.config.feature_settings())
        cached = self.style_cache.get(key)
        if cached is not None:
            return cached
        size = self.working_size(*style.shape[:2])
        latents = self.encode(self._to_tensor([style], size))
        keys = ("k", "v") if self.config.inject_kv else ()
        trajectory, recorded = self._invert_recording(latents, keys)
        features = StyleFeatures(
            key, recorded.get("k", {}), recorded.get("v", {}), trajectory[self.schedule.timesteps[0]]
        )
        self.style_cache.put(features)
        log.debug("style %s inverted: %.1f MiB of features", key[:12], features.nbytes / 2**20)
        return features

    def content_pass(self, latents: torch.Tensor, faces: bool = True) -> ContentPass:
        """DDIM-invert content latents, recording queries (and, with ``faces``, keys/values for content-attention
        reweighting, which only acts inside a face mask)."""
        cfg = self.config
        keys: tuple[str, ...] = ()
        if cfg.query_preservation:
            keys += ("q",)
        if faces and cfg.reweight and cfg.content_kv_weight > 0:
            keys += ("k", "v")
        trajectory, recorded = self._invert_recording(latents, keys)
        return ContentPass(recorded.get("q"), recorded.get("k"), recorded.get("v"), trajectory)

    @staticmethod
    def adain(
        content: torch.Tensor, style: torch.Tensor, region: torch.Tensor | None = None, eps: float = 1e-5
    ) -> torch.Tensor:
        """Per-channel AdaIN of latents: the content's normalized latent with the style's mean and std.

        ``region`` (B, 1, h, w), when given, restricts the content's statistics to where it is 1 (the real image
        in a mosaic canvas), so the upscaled face tiles do not shift them.
        """
        if region is None:
            c_mean, c_std = content.mean((2, 3), keepdim=True), content.std((2, 3), keepdim=True)
        else:
            weight = region / region.sum((2, 3), keepdim=True).clamp(min=1)
            c_mean = (content * weight).sum((2, 3), keepdim=True)
            c_std = ((content - c_mean) ** 2 * weight).sum((2, 3), keepdim=True).sqrt()
        s_mean, s_std = style.mean((2, 3), keepdim=True), style.std((2, 3), keepdim=True)
        return (content - c_mean) / (c_std + eps) * s_std + s_mean

    def sample(self, z_T: torch.Tensor, style: StyleFeatures, content: ContentPass, mask: torch.Tensor | None):
        """DDIM sampling with injection and content consistency guidance; returns clean latents (float32)."""
        cfg, state, schedule = self.config, self.state, self.schedule
        n = len(schedule)
        state.style_k = style.k if cfg.inject_kv else None
        state.style_v = style.v if cfg.inject_kv else None
        state.content_q = content.q
        state.content_k, state.content_v = content.k, content.v
        state.gamma = cfg.gamma if cfg.query_preservation else None
        state.face_gamma = cfg.face_gamma if cfg.reweight else None
        state.content_kv_weight = cfg.content_kv_weight if cfg.reweight else 0.0
        state.temperature = cfg.temperature
        state.set_face_mask(mask)
        z_content = content.trajectory[-1]
        x = z_T.float()
        try:
            for index, t in enumerate(schedule.timesteps):
                a_t, a_prev = schedule.alpha_t[index], schedule.alpha_prev[index]
                state.timestep = t
                state.feature_timestep = self._feature_t.get(t, t)
                injecting = self._injecting() and self._feature_t and in_window(cfg.injection_steps, index, n)
                state.mode = "inject" if injecting else "off"
                guided = mask is not None and cfg.guidance and in_window(cfg.guidance_steps, index, n)
                if guided:
                    eps, grad = self.guidance_gradient(x, index, mask, z_content)
                    x = x - cfg.guidance_weight * a_t * grad
                else:
                    with torch.no_grad():
                        eps, _ = schedule.eps_and_x0(self._unet_call(x, t).float(), x, a_t)
                x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
                x = ddim_move(x0, eps, a_prev)
                if mask is not None and cfg.anchor and in_window(cfg.anchor_steps, index, n):
                    x = x + cfg.anchor_weight * mask * (self.anchor_target(content, index) - x)
        finally:
            state.mode = "off"
            state.style_k = state.style_v = state.content_q = state.content_k = state.content_v = None
            state.set_face_mask(None)
        return x.detach()

    # ---- the Stylizer interface ----------------------------------------------------------------------------------

    #: ``content_region`` restricts the AdaIN statistics of the content to the real image of a mosaic canvas
    accepts_content_region = True

    def stylize_batch(
        self,
        contents: list[np.ndarray],
        styles: list[np.ndarray],
        faces: list[list[Face]] | None = None,
        content_regions: list[tuple[int, int, int, int] | None] | None = None,
    ) -> list[np.ndarray]:
        """Stylize many images: contents sharing a style and a working size go through the UNet together.

        ``content_regions`` (optional, one (x0, y0, x1, y1) or ``None`` per content, in its pixels): the part of
        each content that is the real image, the rest being mosaic tiles (see ``MosaicRestorer``).
        """
        if len(styles) != len(contents):
            raise ValueError(f"got {len(contents)} contents but {len(styles)} styles")
        faces = faces if faces is not None else [[] for _ in contents]
        regions = content_regions if content_regions is not None else [None] * len(contents)
        contents = [_as_rgb(c, "content") for c in contents]
        style_by_id: dict[int, StyleFeatures] = {}
        groups: dict[tuple, list[int]] = {}
        for i, (content, style) in enumerate(zip(contents, styles)):
            if id(style) not in style_by_id:
                style_by_id[id(style)] = self.style_features(style)
            key = (self.working_size(*content.shape[:2]), style_by_id[id(style)].key)
            groups.setdefault(key, []).append(i)
        outputs: list[np.ndarray | None] = [None] * len(contents)
        for (size, _), members in groups.items():
            for start in range(0, len(members), self.config.batch_size):
                chunk = members[start : start + self.config.batch_size]
                style = style_by_id[id(styles[chunk[0]])]
                chunk_faces = [faces[i] or [] for i in chunk]
                chunk_regions = [regions[i] for i in chunk]
                results = self._stylize_group([contents[i] for i in chunk], style, chunk_faces, size, chunk_regions)
                for i, out in zip(chunk, results):
                    outputs[i] = out
        return outputs  # type: ignore[return-value]

    def stylize_latents(
        self,
        latents: torch.Tensor,
        style: StyleFeatures,
        mask: torch.Tensor | None = None,
        region: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stylize clean content latents (B, C, h, w) after cached style features; returns clean latents."""
        content = self.content_pass(latents, faces=mask is not None)
        z_T = content.trajectory[self.schedule.timesteps[0]]
        if self.config.adain:
            z_T = self.adain(z_T, style.z_T, region)
        return self.sample(z_T, style, content, mask)

    def _region_mask(self, regions, sizes, latent_hw) -> torch.Tensor | None:
        if all(r is None for r in regions):
            return None
        h, w = latent_hw
        out = torch.zeros(len(regions), 1, h, w, device=self.device)
        for i, (region, (ch, cw)) in enumerate(zip(regions, sizes)):
            x0, y0, x1, y1 = region if region is not None else (0, 0, cw, ch)
            ys = slice(int(y0 * h / ch), max(int(y0 * h / ch) + 1, round(y1 * h / ch)))
            xs = slice(int(x0 * w / cw), max(int(x0 * w / cw) + 1, round(x1 * w / cw)))
            out[i, 0, ys, xs] = 1
        return out

    def _stylize_group(
        self,
        contents: list[np.ndarray],
        style: StyleFeatures,
        faces: list[list[Face]],
        size: tuple[int, int],
        regions: list[tuple[int, int, int, int] | None],
    ) -> list[np.ndarray]:
        latents = self.encode(self._to_tensor(contents, size))
        sizes = [c.shape[:2] for c in contents]
        mask = self.face_mask(faces, sizes, latents.shape[-2:])
        region = self._region_mask(regions, sizes, latents.shape[-2:])
        out = self.decode(self.stylize_latents(latents, style, mask, region))
        images = []
        for image, (h, w) in zip(out, sizes):
            image = image[None]
            if tuple(image.shape[-2:]) != (h, w):
                image = F.interpolate(image, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            pixels = ((image[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
            images.append(pixels.cpu().numpy())
        return images
