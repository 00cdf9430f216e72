"""The frozen Stable Diffusion + CLIP vision components FaceSnap runs on: tiny in-process ones, or loaded ones."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig, CLIPVisionModel

from stylid_core.customize.facesnap.config import TinyComponentsConfig

#: OpenAI CLIP preprocessing constants (all SD 1.x / IP-Adapter image encoders use them)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class SDComponents:
    """A frozen SD 1.x model plus the CLIP vision encoder whose patch tokens feed the attribute mixer."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    image_encoder: CLIPVisionModel
    scheduler: DDIMScheduler  # sampling
    noise_scheduler: DDPMScheduler  # training

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def frozen(self) -> SDComponents:
        """Put every component in eval mode with gradients off (FaceSnap never trains them)."""
        for m in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            m.requires_grad_(False)
            m.eval()
        return self

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDComponents:
        for m in (self.unet, self.vae, self.text_encoder, self.image_encoder):
            m.to(device) if dtype is None else m.to(device=device, dtype=dtype)
        return self


def byte_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer over a printable-byte alphabet, built without files (for tiny models)."""
    chars = [chr(c) for c in range(33, 127)]
    vocab: dict[str, int] = {}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = []
    for a, b in (("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n")):
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    vocab["the</w>"] = vocab.get("the</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_components(config: TinyComponentsConfig | None = None) -> SDComponents:
    """Tiny random SD 1.x-shaped components, the way diffusers' own tests build them (0.1 s on a CPU)."""
    config = config or TinyComponentsConfig()
    torch.manual_seed(config.seed)
    boc = tuple(config.block_out_channels)
    unet = UNet2DConditionModel(
        block_out_channels=boc,
        layers_per_block=1,
        sample_size=config.sample_size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(boc) - 1),
        up_block_types=("UpBlock2D",) * (len(boc) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=config.cross_attention_dim,
        attention_head_dim=(2, 4)[: len(boc)] if len(boc) == 2 else 4,
        norm_num_groups=min(32, boc[0]),
    )
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=config.sample_size,
    )
    torch.manual_seed(config.seed)
    tokenizer = byte_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=config.cross_attention_dim,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
        )
    )
    torch.manual_seed(config.seed)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=config.vision_hidden,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=config.vision_image_size,
            patch_size=config.vision_patch,
            projection_dim=config.vision_hidden,
        )
    )
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=image_encoder,
        scheduler=_ddim(),
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),  # fmt: skip
    ).frozen()


#: CLIP vision towers by name: IP-Adapter's image encoder (OpenCLIP ViT-H/14) and OpenAI's ViT-L/14
VISION_TOWERS = {
    "vit-h-14": dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                     projection_dim=1024, hidden_act="gelu"),
    "vit-l-14": dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     projection_dim=768, hidden_act="quick_gelu"),
}  # fmt: skip


def random_sd15_components(sample_size: int = 512, image_encoder: str = "vit-h-14", seed: int = 0) -> SDComponents:
    """Stable Diffusion 1.5-shaped components with random weights (no download), from the published configs in
    ``stylid_core.stylize.diffusion.sd_shaped``: the 860M-parameter UNet, the VAE, the CLIP ViT-L/14 text encoder,
    and a CLIP vision tower (``VISION_TOWERS``). For timings and memory at true size (benchmarks); ``sample_size``
    is the image size in px. The tokenizer is the tiny byte-level one (token ids only index the real-sized
    embedding table)."""
    if image_encoder not in VISION_TOWERS:
        raise ValueError(f"image_encoder must be one of {sorted(VISION_TOWERS)}: {image_encoder!r}")
    from stylid_core.stylize.diffusion.sd_shaped import SD15_TEXT_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**SD15_UNET_CONFIG, "sample_size": sample_size // 8})
    vae = AutoencoderKL(**{**SD15_VAE_CONFIG, "sample_size": sample_size})
    tokenizer = byte_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**SD15_TEXT_CONFIG, **ids}))
    vision = CLIPVisionModel(CLIPVisionConfig(image_size=224, patch_size=14, **VISION_TOWERS[image_encoder]))
    return SDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        image_encoder=vision,
        scheduler=_ddim(),
        noise_scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        ),  # fmt: skip
    ).frozen()


def _ddim() -> DDIMScheduler:
    from stylid_core.stylize.diffusion.sd_shaped import SD15_SCHEDULER_CONFIG

    return DDIMScheduler(**SD15_SCHEDULER_CONFIG)


def load_components(base_model: str, image_encoder: str, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load SD 1.x (a diffusers folder or hub id) and a CLIP vision encoder (folder or hub id, or ``base:subfolder``).

    Nothing is downloaded when ``HF_HUB_OFFLINE=1``; local folders always work offline.
    """
    sub = {"subfolder": None}
    if image_encoder and ":" in image_encoder and not os.path.exists(image_encoder):
        image_encoder, sub["subfolder"] = image_encoder.rsplit(":", 1)
    kw = {"dtype": dtype}
    comps = SDComponents(
        unet=UNet2DConditionModel.from_pretrained(base_model, subfolder="unet", **kw),
        vae=AutoencoderKL.from_pretrained(base_model, subfolder="vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(base_model, subfolder="text_encoder", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(base_model, subfolder="tokenizer"),
        image_encoder=CLIPVisionModel.from_pretrained(image_encoder, **{k: v for k, v in sub.items() if v}, **kw),
        scheduler=DDIMScheduler.from_pretrained(base_model, subfolder="scheduler"),
        noise_scheduler=DDPMScheduler.from_pretrained(base_model, subfolder="scheduler"),
    )
    return comps.frozen()
