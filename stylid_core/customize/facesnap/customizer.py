"""The ``facesnap`` backend of the ``Customizer`` interface."""

from __future__ import annotations

import numpy as np
import torch

from stylid_core.customize.base import Customizer
from stylid_core.customize.facesnap.components import load_components, tiny_components
from stylid_core.customize.facesnap.config import FaceSnapConfig
from stylid_core.customize.facesnap.engine import FaceSnapEngine, tiny_model_config
from stylid_core.customize.facesnap.modules import FaceSnapModules, load_facesnap
from stylid_core.faces.base import Face

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA (fp16) when present, else CPU (fp32)."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto"
                                                                                     else device))  # fmt: skip
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, _DTYPES[dtype]


class FaceSnapCustomizer(Customizer):
    """FaceSnap (arXiv 2602.00627): identity tokens + predicted landmarks condition a frozen SD 1.x UNet."""

    name = "facesnap"

    def __init__(self, config: FaceSnapConfig) -> None:
        self.config = config
        device, dtype = resolve_device(config.device, config.dtype)
        if config.tiny is not None:
            components = tiny_components(config.tiny)
        else:
            if not config.image_encoder:
                raise ValueError("facesnap.image_encoder (a CLIPVisionModel folder or hub id) is required")
            components = load_components(config.base_model, config.image_encoder)
        if config.checkpoint:
            modules = load_facesnap(config.checkpoint, components.unet, config.storage_options)
        else:
            torch.manual_seed(config.tiny.seed if config.tiny else 0)
            model_cfg = config.model or tiny_model_config(components)
            modules = FaceSnapModules(model_cfg, components.unet)
        self.engine = FaceSnapEngine(components, modules, config.scheduler).to(device, dtype)
        self.model = config.checkpoint or ("tiny" if config.tiny else str(config.base_model))

    @property
    def embedding_dim(self) -> int:
        """The face-recognition embedding size the reference face must carry."""
        return self.engine.config.face_embed_dim

    def generate(
        self,
        reference: np.ndarray,
        reference_face: Face,
        prompt: str,
        num_images: int = 1,
        pose: np.ndarray | None = None,
        seed: int = 0,
    ) -> list[np.ndarray]:
        c = self.config
        return self.engine.generate(
            reference, reference_face, prompt, num_images, pose, seed,
            resolution=c.tiny.sample_size if c.tiny else c.resolution,
            num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
            negative_prompt=c.negative_prompt, identity_scale=c.identity_scale, landmark_scale=c.landmark_scale,
            max_batch=c.max_batch, landmark_steps_end=c.landmark_steps_end,
        )  # fmt: skip
