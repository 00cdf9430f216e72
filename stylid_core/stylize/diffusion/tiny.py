"""A tiny Stable-Diffusion-shaped model built in-process from configs (no files, no downloads).

The components follow diffusers' own pipeline tests (UNet ``block_out_channels=(32, 64)``, a 2-layer 32-dim CLIP
text encoder, a (32, 64) VAE). Weights are random but seeded, and the UNet's ``conv_out`` is scaled down so that
DDIM inversion followed by DDIM sampling reconstructs the starting latent closely (a random UNet with full-size
outputs does not). The decoded images are noise-like: the tiny model exercises the code paths, not the look.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: what reports say ran when the tiny model is used
TINY_MODEL_NAME = "tiny-random (noise-like output)"


#: Stable Diffusion 1.x's DDIM schedule (its ``scheduler_config.json``); the tiny and SD-shaped models both use it
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


@dataclass
class DiffusionComponents:
    """The pieces of a Stable Diffusion checkpoint the engine uses."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object


def tiny_clip_tokenizer():
    """A ``CLIPTokenizer`` over a byte alphabet, built with no vocabulary files."""
    from transformers import CLIPTokenizer

    # GPT-2's byte-to-unicode alphabet: printable bytes map to themselves, the rest to code points from 256 up
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab: dict[str, int] = {}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        vocab.setdefault(ch + "</w>", len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_tiny_components(seed: int = 0, conv_out_scale: float = 1e-3) -> DiffusionComponents:
    """Tiny UNet/VAE/text encoder/tokenizer/DDIM scheduler, seeded; ``conv_out`` scaled by ``conv_out_scale``.

    Both UNet blocks carry cross-attention transformer blocks, so the decoder has self-attention (``attn1``) at
    the full and the half latent resolution, like SD's ``up_blocks.2``/``up_blocks.3``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        with torch.no_grad():
            unet.conv_out.weight.mul_(conv_out_scale)
            unet.conv_out.bias.mul_(conv_out_scale)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=64,
        )
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                bos_token_id=0,
                eos_token_id=2,
                hidden_size=32,
                intermediate_size=37,
                layer_norm_eps=1e-05,
                num_attention_heads=4,
                num_hidden_layers=2,
                pad_token_id=1,
                vocab_size=1000,
            )
        )
    finally:
        torch.random.set_rng_state(gen_state)
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    tokenizer = tiny_clip_tokenizer()
    for module in (unet, vae, text_encoder):
        module.eval().requires_grad_(False)
    return DiffusionComponents(unet, vae, text_encoder, tokenizer, scheduler)
