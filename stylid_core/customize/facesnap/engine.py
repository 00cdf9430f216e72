"""FaceSnap inference: reference photo + prompt (+ pose) -> portraits in one sampling pass."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from stylid_core.customize.facesnap.components import CLIP_MEAN, CLIP_STD, SDComponents
from stylid_core.customize.facesnap.config import FaceSnapModelConfig
from stylid_core.customize.facesnap.faceprep import align_face, relative_landmarks, shared_landmarker
from stylid_core.customize.facesnap.landmarks import keypoints5_from_68, render_landmark_map
from stylid_core.customize.facesnap.modules import FaceSnapModules
from stylid_core.faces.base import Face


def tiny_model_config(components: SDComponents, face_embed_dim: int = 128, **overrides) -> FaceSnapModelConfig:
    """Module sizes matching tiny components (tests, CPU smoke runs)."""
    base = dict(
        clip_dim=components.image_encoder.config.hidden_size,
        face_embed_dim=face_embed_dim,
        cross_attention_dim=components.unet.config.cross_attention_dim,
        num_tokens=4,
        mixer_dim=32,
        mixer_depth=1,
        mixer_heads=4,
        predictor_hidden=64,
        predictor_depth=2,
    )
    base.update(overrides)
    return FaceSnapModelConfig(**base)


def clip_pixels(crops: list[np.ndarray], size: int) -> torch.Tensor:
    """Aligned RGB uint8 crops (already ``size`` square) -> CLIP-normalised (B, 3, size, size) float tensor."""
    x = torch.from_numpy(np.stack([c[:size, :size] for c in crops])).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def landmark_branch_steps(num_steps: int, steps_end: float) -> int:
    """How many leading denoising steps run the landmark branch: those ``i`` with ``(i + 1) / num_steps <= steps_end``.

    The rule of diffusers' ControlNet pipelines for ``control_guidance_end`` (with ``control_guidance_start`` 0):
    1.0 runs it on every step, 0.5 on the first half, 0 on none.
    """
    return sum(1 for i in range(num_steps) if (i + 1) / num_steps <= steps_end)


def make_scheduler(name: str, base: DDIMScheduler):
    """The sampling scheduler ``name`` configured like ``base``."""
    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "dpm": DPMSolverMultistepScheduler}[name]
    return cls.from_config(base.config)


class FaceSnapEngine:
    """Frozen SD 1.x components + trained FaceSnap modules, with a plain classifier-free-guided sampling loop.

    The loop follows diffusers' ``StableDiffusionPipeline`` step for step, so with the identity scale at 0 and the
    landmark branch off its images equal the plain pipeline's.
    """

    def __init__(self, components: SDComponents, modules: FaceSnapModules, scheduler: str = "ddim") -> None:
        self.components = components
        self.modules = modules.eval().requires_grad_(False)
        self.modules.identity.install(components.unet)
        self.scheduler = make_scheduler(scheduler, components.scheduler)
        self.config = modules.config

    @property
    def device(self) -> torch.device:
        return self.components.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.components.unet.dtype

    def to(self, device, dtype=None) -> FaceSnapEngine:
        self.components.to(device, dtype)
        self.modules.to(device=device, dtype=dtype)
        return self

    # ---- conditioning -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tok = self.components.tokenizer
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return self.components.text_encoder(ids.input_ids.to(self.device))[0].to(self.dtype)

    def patch_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP vision tokens of the penultimate layer (the low-level features the mixer looks up)."""
        out = self.components.image_encoder(pixels.to(self.device, self.dtype), output_hidden_states=True)
        return out.hidden_states[-2]

    @torch.no_grad()
    def identity_tokens(self, crops: list[np.ndarray], embeddings: np.ndarray) -> torch.Tensor:
        size = self.components.image_encoder.config.image_size
        patches = self.patch_tokens(clip_pixels(crops, size))
        emb = torch.as_tensor(np.asarray(embeddings, np.float32), device=self.device)
        return self.modules.mixer(patches, emb.to(self.dtype))

    def reference_landmarks(self, reference: np.ndarray, face: Face) -> np.ndarray:
        """The reference's landmarks in the model's layout (5 or 68), in pixels."""
        if self.config.num_landmarks == 5:
            return np.asarray(face.keypoints, np.float32)
        if face.landmarks is not None and len(face.landmarks) == 68:
            return np.asarray(face.landmarks, np.float32)
        return shared_landmarker().landmarks(reference, face.box)

    def target_landmarks(self, reference: np.ndarray, face: Face, pose: np.ndarray | None) -> torch.Tensor:
        """Landmarks (1, N, 2; relative coords) of the reference's face in the pose of ``pose``.

        ``pose``: None (keep the reference's pose), a driving RGB image, (yaw, pitch, roll) radians, or (N, 2)
        landmarks in relative coordinates.
        """
        h, w = reference.shape[:2]
        ref = torch.from_numpy(relative_landmarks(self.reference_landmarks(reference, face), h, w))[None]
        ref = ref.to(self.device, self.dtype)
        driving = angles = None
        if pose is None:
            driving = ref
        else:
            pose = np.asarray(pose)
            if pose.ndim == 3:
                driving = torch.from_numpy(self._driving_landmarks(pose))[None].to(self.device, self.dtype)
            elif pose.shape == (3,):
                angles = torch.from_numpy(pose.astype(np.float32))[None].to(self.device, self.dtype)
            elif pose.shape == (self.config.num_landmarks, 2):
                driving = torch.from_numpy(pose.astype(np.float32))[None].to(self.device, self.dtype)
            else:
                raise ValueError(f"pose must be an RGB image, 3 angles or landmarks, got shape {pose.shape}")
        with torch.no_grad():
            return self.modules.predictor(ref, driving_landmarks=driving, pose_angles=angles)[0]

    def _driving_landmarks(self, image: np.ndarray) -> np.ndarray:
        lm = shared_landmarker()
        boxes = lm.detect(image)
        if not boxes:
            raise ValueError("no face found in the pose image")
        points = lm.landmarks(image, boxes[0])
        if self.config.num_landmarks == 5:
            points = keypoints5_from_68(points)
        return relative_landmarks(points, *image.shape[:2])

    def landmark_map(self, landmarks: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        up = self.config.landmark_map_upscale
        return render_landmark_map(
            landmarks, latent_hw[0] * up, latent_hw[1] * up, self.config.landmark_channels, self.config.landmark_sigma
        )

    # ---- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        identity_tokens: torch.Tensor | None,
        landmarks: torch.Tensor | None,
        resolution: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator,
        identity_scale: float = 1.0,
        landmark_scale: float = 1.0,
        max_batch: int = 64,
        landmark_steps_end: float = 1.0,
    ) -> np.ndarray:
        """Images (B, H, W, 3) float in [0, 1]; every per-image input has batch size B (or 1, broadcast).

        The landmark branch runs on the first ``landmark_steps_end`` fraction of the steps only (see
        ``landmark_branch_steps``); on the others it is not computed at all.
        """
        comps = self.components
        n = prompt_embeds.shape[0]
        lat_hw = (resolution // comps.vae_scale_factor, resolution // comps.vae_scale_factor)
        shape = (n, comps.unet.config.in_channels, *lat_hw)
        # drawn at once for the whole batch, so the images do not depend on max_batch
        all_latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        lmap = None if landmarks is None else self.landmark_map(landmarks.to(self.device, self.dtype), lat_hw)
        out = []
        for a in range(0, n, max_batch):
            sl = slice(a, min(n, a + max_batch))

            def pick(t: torch.Tensor | None, sl: slice = sl) -> torch.Tensor | None:
                return None if t is None else (t if t.shape[0] == 1 else t[sl])

            out.append(
                self._sample_chunk(
                    all_latents[sl],
                    prompt_embeds[sl],
                    pick(negative_embeds),
                    pick(identity_tokens),
                    pick(lmap),
                    num_inference_steps,
                    guidance_scale,
                    generator,
                    identity_scale,
                    landmark_scale,
                    landmark_steps_end,
                )  # fmt: skip
            )
        return np.concatenate(out)

    def _sample_chunk(
        self, latents, cond, uncond, id_tokens, lmap, steps, guidance, generator, id_scale, lm_scale, lm_end
    ):  # fmt: skip
        comps, sched = self.components, self.scheduler
        b = latents.shape[0]
        cfg = guidance > 1.0 and uncond is not None
        sched.set_timesteps(steps, device=self.device)
        latents = latents * sched.init_noise_sigma
        text = torch.cat([uncond.expand(b, -1, -1), cond]) if cfg else cond
        tokens = None
        if id_tokens is not None:
            tokens = id_tokens.expand(b, -1, -1).to(self.dtype)
            tokens = torch.cat([torch.zeros_like(tokens), tokens]) if cfg else tokens
        if lmap is not None:
            lmap = lmap.expand(b, -1, -1, -1)
            lmap = torch.cat([lmap, lmap]) if cfg else lmap
        branch_steps = landmark_branch_steps(len(sched.timesteps), lm_end)
        for i, t in enumerate(sched.timesteps):
            x = torch.cat([latents] * 2) if cfg else latents
            x = sched.scale_model_input(x, t)
            step_map = lmap if i < branch_steps else None  # no landmark map: the branch is skipped entirely
            eps = self.modules.identity.predict_noise(comps.unet, x, t, text, tokens, step_map, id_scale, lm_scale)
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            latents = sched.step(eps, t, latents, return_dict=False)[0]
        image = comps.vae.decode(latents / comps.vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()

    def generate(
        self,
        reference: np.ndarray,
        reference_face: Face,
        prompt: str,
        num_images: int = 1,
        pose: np.ndarray | None = None,
        seed: int = 0,
        *,
        resolution: int = 512,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        negative_prompt: str = "",
        identity_scale: float = 1.0,
        landmark_scale: float = 1.0,
        max_batch: int = 4,
        landmark_steps_end: float = 1.0,
    ) -> list[np.ndarray]:
        """``num_images`` RGB uint8 portraits of the reference's identity following ``prompt``."""
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        embedding = reference_face.embedding
        if embedding is None and self.config.face_embed_dim == 128:
            embedding = shared_landmarker().embed(reference, reference_face.box)
        if embedding is None or np.asarray(embedding).size != self.config.face_embed_dim:
            got = None if embedding is None else np.asarray(embedding).size
            raise ValueError(f"the reference face needs a {self.config.face_embed_dim}-d embedding, got {got}")
        tokens = landmarks = None
        if identity_scale > 0:
            size = self.components.image_encoder.config.image_size
            crop = align_face(reference, reference_face.keypoints, size)
            tokens = self.identity_tokens([crop], np.asarray(embedding, np.float32).reshape(1, -1))
        if landmark_scale > 0 and landmark_steps_end > 0 and self.modules.identity.controlnet is not None:
            landmarks = self.target_landmarks(reference, reference_face, pose)
        cond = self.encode_prompt([prompt]).expand(num_images, -1, -1)
        uncond = self.encode_prompt([negative_prompt]) if guidance_scale > 1.0 else None
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = self.sample(
            cond, uncond, tokens, landmarks, resolution, num_inference_steps, guidance_scale, generator,
            identity_scale, landmark_scale, max_batch, landmark_steps_end,
        )  # fmt: skip
        return [(img * 255).round().astype(np.uint8) for img in images]
