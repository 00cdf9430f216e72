"""A Stable-Diffusion-1.5-shaped model with random weights, built in-process from configs (no files, no downloads).

For benchmarks: the UNet, VAE and CLIP text encoder have exactly SD 1.5's architecture (859.5M, 83.7M and 123.1M
parameters), so per-call cost and memory are true to the real model while nothing has to be downloaded. The
configs below are SD 1.5's published ``config.json`` values, written out here. As with the tiny model, the UNet's
``conv_out`` is scaled down so DDIM trajectories stay bounded (its cost is unchanged); the output is noise-like.
"""

from __future__ import annotations

import torch

from stylid_core.stylize.diffusion.tiny import SD15_SCHEDULER_CONFIG, DiffusionComponents, tiny_clip_tokenizer

#: the ``model`` option that builds it
SD15_SHAPED = "sd15-shaped"
#: what reports say ran
SD15_SHAPED_MODEL_NAME = "sd15-shaped (random weights, noise-like output)"

SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    flip_sin_to_cos=True,
    freq_shift=0,
)

SD15_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)


def build_sd15_shaped_components(seed: int = 0, conv_out_scale: float = 1e-3) -> DiffusionComponents:
    """SD-1.5-shaped UNet/VAE/CLIP text encoder with seeded random weights, the DDIM scheduler, a byte tokenizer.

    Built in float32 on the CPU (about 4.3 GB); move or cast them afterwards (the engine does).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        with torch.no_grad():
            unet.conv_out.weight.mul_(conv_out_scale)
            unet.conv_out.bias.mul_(conv_out_scale)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    finally:
        torch.random.set_rng_state(gen_state)
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    return DiffusionComponents(unet, vae, text_encoder, tiny_clip_tokenizer(), scheduler)
