"""The trainable FaceSnap modules as one ``nn.Module``, saved as one safetensors file plus a JSON config."""

from __future__ import annotations

import json
import os

import fsspec
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from stylid_core.customize.facesnap.config import FaceSnapModelConfig
from stylid_core.customize.facesnap.identity_module import IdentityPreservingModule
from stylid_core.customize.facesnap.landmarks import LandmarkPredictor
from stylid_core.customize.facesnap.mixer import FacialAttributeMixer

WEIGHTS_NAME = "facesnap.safetensors"
CONFIG_NAME = "facesnap_config.json"


class FaceSnapModules(nn.Module):
    """Facial attribute mixer + landmark predictor + identity-preserving module (everything FaceSnap trains)."""

    def __init__(self, config: FaceSnapModelConfig, unet: UNet2DConditionModel,
                 controlnet: ControlNetModel | None = None) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        self.mixer = FacialAttributeMixer(config)
        self.predictor = LandmarkPredictor(config)
        self.identity = IdentityPreservingModule(config, unet, controlnet)


def save_facesnap(modules: FaceSnapModules, path: str, storage_options: dict | None = None) -> None:
    """Write ``facesnap.safetensors`` and ``facesnap_config.json`` under ``path`` (any fsspec URI), one put each."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in modules.state_dict().items()}
    meta = {"model": modules.config.to_dict()}
    if modules.identity.controlnet is not None:
        meta["controlnet"] = dict(modules.identity.controlnet.config)
    with fs.open(f"{root}/{WEIGHTS_NAME}", "wb") as f:
        f.write(save_safetensors_bytes(state, metadata={"format": "pt"}))
    with fs.open(f"{root}/{CONFIG_NAME}", "w") as f:
        json.dump(meta, f, indent=2, default=list)


def read_facesnap(path: str, storage_options: dict | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON metadata, weights) of a checkpoint written by ``save_facesnap``."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not fs.exists(f"{root}/{name}"):
            raise FileNotFoundError(f"no {name} in FaceSnap checkpoint {path!r}")
    with fs.open(f"{root}/{CONFIG_NAME}", "r") as f:
        meta = json.load(f)
    with fs.open(f"{root}/{WEIGHTS_NAME}", "rb") as f:
        state = load_safetensors_bytes(f.read())
    return meta, state


def load_facesnap(path: str, unet: UNet2DConditionModel, storage_options: dict | None = None) -> FaceSnapModules:
    """Rebuild the modules saved by ``save_facesnap`` at ``path`` (local folder or fsspec URI; never downloads)."""
    meta, state = read_facesnap(path, storage_options)
    config = FaceSnapModelConfig.from_dict(meta["model"])
    controlnet = None
    if config.use_controlnet:
        cn_config = {k: v for k, v in meta["controlnet"].items() if not k.startswith("_")}
        controlnet = ControlNetModel.from_config(cn_config)
    modules = FaceSnapModules(config, unet, controlnet)
    modules.load_state_dict(state, strict=True)
    return modules


def trainable_parameters(modules: FaceSnapModules) -> list[torch.nn.Parameter]:
    return [p for p in modules.parameters() if p.requires_grad]


def is_checkpoint(path: str, storage_options: dict | None = None) -> bool:
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return fs.exists(os.path.join(root, WEIGHTS_NAME).replace("\\", "/"))
