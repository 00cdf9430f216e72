"""The ``ip_adapter_faceid`` customizer: SD 1.x + IP-Adapter-FaceID (diffusers ``load_ip_adapter``) on ArcFace.

A baseline for FaceSnap. The identity comes only from the reference face's 512-d ArcFace embedding (insightface
``buffalo_l``; the ``FaceAnalyzer`` must be the insightface backend). Weights are read from local folders, e.g.
``h94/IP-Adapter-FaceID``'s ``ip-adapter-faceid_sd15.bin`` downloaded beforehand; nothing is downloaded here.

IP-Adapter-FaceID was trained with a LoRA on the UNet's attention projections. The ``.bin`` carries it (as
``ip_adapter.<i>.to_q_lora...`` keys) and diffusers applies it while loading the adapter, as the PEFT adapter
``faceid_0``; adapter files without it (e.g. converted ones) take the LoRA from ``lora_path``: the separately
published ``ip-adapter-faceid_sd15_lora.safetensors`` (kohya layout, ``lora_unet_<module>.lora_down/lora_up``) or
any LoRA that diffusers' ``load_lora_weights`` reads (kohya, diffusers/PEFT). ``lora_scale`` weights either one.
Both need ``peft`` (diffusers' LoRA backend).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from stylid_core.config import _check
from stylid_core.customize.base import CUSTOMIZERS, Customizer
from stylid_core.customize.facesnap.config import build_config
from stylid_core.faces.base import Face

#: PEFT adapter name of the LoRA loaded from ``lora_path``
LORA_ADAPTER = "faceid_lora"


@dataclass
class IPAdapterFaceIDConfig:
    """Base model, adapter file and sampling settings of the ``ip_adapter_faceid`` backend."""

    base_model: str = ""  # diffusers SD 1.x folder (or hub id, offline cache only)
    adapter_path: str = ""  # folder holding the adapter file
    weight_name: str = "ip-adapter-faceid_sd15.bin"
    adapter_scale: float = 1.0
    lora_path: str | None = None  # local LoRA file for the UNet, e.g. ip-adapter-faceid_sd15_lora.safetensors
    lora_scale: float = 1.0  # weight of the FaceID LoRA (from lora_path, or the one inside the adapter file)
    resolution: int = 512
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    negative_prompt: str = ""
    scheduler: str = "ddim"  # ddim | euler | dpm
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = 4

    def __post_init__(self) -> None:
        _check(bool(self.base_model), "ip_adapter_faceid.base_model is required")
        _check(bool(self.adapter_path), "ip_adapter_faceid.adapter_path (a local folder) is required")
        _check(self.adapter_scale >= 0, "ip_adapter_faceid.adapter_scale must be >= 0")
        _check(self.lora_scale >= 0, "ip_adapter_faceid.lora_scale must be >= 0")
        _check(self.resolution % 8 == 0, "ip_adapter_faceid.resolution must be a multiple of 8")
        _check(self.num_inference_steps >= 1 and self.max_batch >= 1, "steps and max_batch must be >= 1")
        _check(self.scheduler in ("ddim", "euler", "dpm"), f"unknown scheduler {self.scheduler!r}")


class IPAdapterFaceIDCustomizer(Customizer):
    """SD 1.x with IP-Adapter-FaceID: the ArcFace embedding becomes 4 tokens in decoupled cross-attention."""

    name = "ip_adapter_faceid"
    embedding_dim = 512

    def __init__(self, config: IPAdapterFaceIDConfig) -> None:
        import torch
        from diffusers import StableDiffusionPipeline

        from stylid_core.customize.facesnap.customizer import resolve_device
        from stylid_core.customize.facesnap.engine import make_scheduler

        if not os.path.isfile(os.path.join(config.adapter_path, config.weight_name)):
            raise FileNotFoundError(f"no {config.weight_name} in {config.adapter_path!r}")
        # without peft diffusers skips the LoRA inside the adapter file with only a log line
        _require_peft("ip_adapter_faceid (the FaceID LoRA)")
        if config.lora_path and not os.path.isfile(config.lora_path):
            raise FileNotFoundError(f"ip_adapter_faceid.lora_path: no file {config.lora_path!r}")
        self.config = config
        self.device, self.dtype = resolve_device(config.device, config.dtype)
        pipe = StableDiffusionPipeline.from_pretrained(
            config.base_model, safety_checker=None, requires_safety_checker=False, dtype=self.dtype
        )
        pipe.load_ip_adapter(config.adapter_path, subfolder="", weight_name=config.weight_name,
                             image_encoder_folder=None)  # fmt: skip
        pipe.set_ip_adapter_scale(config.adapter_scale)
        self.lora = self._apply_lora(pipe, config)
        pipe.scheduler = make_scheduler(config.scheduler, pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self._torch = torch
        self.model = os.path.join(config.adapter_path, config.weight_name)
        if config.lora_path:
            self.model += f" + {config.lora_path}"

    @staticmethod
    def _apply_lora(pipe, config: IPAdapterFaceIDConfig) -> str | None:
        """Weight the FaceID LoRA by ``lora_scale``: the one diffusers loaded from the adapter file, or the one in
        ``lora_path`` (loaded here). Returns its PEFT adapter name, or None when there is no LoRA."""
        inside = [name for name in getattr(pipe.unet, "peft_config", {}) if name.startswith("faceid_")]
        if config.lora_path:
            if inside:
                raise ValueError(
                    f"{config.weight_name} already carries the FaceID LoRA (diffusers loaded it as {inside[0]});"
                    " drop ip_adapter_faceid.lora_path, or it would be applied twice"
                )
            folder, name = os.path.split(os.path.abspath(config.lora_path))
            pipe.load_lora_weights(folder, weight_name=name, adapter_name=LORA_ADAPTER)
            if LORA_ADAPTER not in getattr(pipe.unet, "peft_config", {}):
                raise ValueError(f"{config.lora_path} holds no LoRA weights for the UNet")
            inside = [LORA_ADAPTER]
        if not inside:
            return None
        pipe.set_adapters(inside[:1], adapter_weights=[config.lora_scale])
        return inside[0]

    def generate(
        self,
        reference: np.ndarray,
        reference_face: Face,
        prompt: str,
        num_images: int = 1,
        pose: np.ndarray | None = None,
        seed: int = 0,
    ) -> list[np.ndarray]:
        """``pose`` is ignored: IP-Adapter-FaceID has no pose control."""
        torch, c = self._torch, self.config
        emb = reference_face.embedding
        if emb is None or np.asarray(emb).size != 512:
            got = None if emb is None else np.asarray(emb).size
            raise ValueError(f"ip_adapter_faceid needs a 512-d ArcFace (insightface) embedding, got {got}")
        emb = np.asarray(emb, np.float32).ravel()
        emb = emb / max(float(np.linalg.norm(emb)), 1e-8)  # insightface's normed_embedding
        ref = torch.from_numpy(emb).view(1, 1, 1, 512)
        cfg = c.guidance_scale > 1.0
        embeds = torch.cat([torch.zeros_like(ref), ref]) if cfg else ref
        embeds = embeds.to(self.device, self.dtype)
        generator = torch.Generator(device="cpu").manual_seed(seed)
        out: list[np.ndarray] = []
        while len(out) < num_images:
            n = min(c.max_batch, num_images - len(out))
            images = self.pipe(
                prompt=prompt, negative_prompt=c.negative_prompt or None, num_images_per_prompt=n,
                ip_adapter_image_embeds=[embeds], height=c.resolution, width=c.resolution,
                num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                generator=generator, output_type="np",
            ).images  # fmt: skip
            out.extend((img * 255).round().astype(np.uint8) for img in images)
        return out


def _require_peft(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ImportError(f"{what} needs the 'peft' package (diffusers' LoRA backend): pip install peft")


@CUSTOMIZERS.register("ip_adapter_faceid")
def create_ip_adapter_faceid(config: IPAdapterFaceIDConfig | dict[str, Any] | None = None, **overrides) -> Customizer:
    """The ``ip_adapter_faceid`` customizer from its config (or dict form; ``overrides`` replace keys)."""
    if isinstance(config, IPAdapterFaceIDConfig):
        data = {f: getattr(config, f) for f in config.__dataclass_fields__}
    else:
        data = dict(config or {})
    data.update(overrides)
    return IPAdapterFaceIDCustomizer(build_config(IPAdapterFaceIDConfig, data, "ip_adapter_faceid"))
