"""Identity-preserving module: decoupled identity cross-attention in the UNet plus a landmark ControlNet branch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from stylid_core.customize.facesnap.config import FaceSnapModelConfig


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b = x.shape[0]
    return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class PlainAttnProcessor(AttnProcessor2_0):
    """diffusers' default processor, accepting (and ignoring) the identity keyword arguments (self-attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 identity_tokens=None, identity_scale=None):  # fmt: skip
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class IdentityAttnProcessor(nn.Module):
    """Decoupled cross-attention: text attention (the UNet's own weights) + ``scale`` x attention over identity tokens.

    The identity keys/values are this processor's own projections (initialised from the text ones). With no
    identity tokens, or a scale of 0, the output is exactly the UNet's text cross-attention.
    """

    def __init__(self, attn: Attention, cross_attention_dim: int) -> None:
        super().__init__()
        inner = attn.to_k.out_features
        self.to_k_id = nn.Linear(cross_attention_dim, inner, bias=False)
        self.to_v_id = nn.Linear(cross_attention_dim, inner, bias=False)
        if attn.to_k.in_features == cross_attention_dim:
            with torch.no_grad():
                self.to_k_id.weight.copy_(attn.to_k.weight)
                self.to_v_id.weight.copy_(attn.to_v.weight)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 identity_tokens=None, identity_scale=None):  # fmt: skip
        if attn.spatial_norm is not None or hidden_states.ndim != 3 or attn.residual_connection:
            raise NotImplementedError("IdentityAttnProcessor supports SD 1.x transformer cross-attention only")
        text_out = AttnProcessor2_0()(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if identity_tokens is None or not identity_scale:
            return text_out
        x = hidden_states
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        query = _split_heads(attn.to_q(x), attn.heads)
        tokens = identity_tokens.to(x.dtype)
        key = _split_heads(self.to_k_id(tokens), attn.heads)
        value = _split_heads(self.to_v_id(tokens), attn.heads)
        id_out = F.scaled_dot_product_attention(query, key, value)
        id_out = id_out.transpose(1, 2).reshape(x.shape[0], -1, query.shape[1] * query.shape[-1])
        # the output projection is linear: out(a) + s*out(b) - s*bias = out(a + s*b)
        id_out = F.linear(id_out, attn.to_out[0].weight) / attn.rescale_output_factor
        return text_out + identity_scale * id_out


def _key(name: str) -> str:
    return name.replace(".", "__")


class IdentityPreservingModule(nn.Module):
    """The trainable parts that inject identity into a frozen SD 1.x UNet.

    - ``processors``: one ``IdentityAttnProcessor`` per UNet cross-attention layer (installed with
      ``install(unet)`` through ``set_attn_processor``; install after any ``load_ip_adapter``, which replaces them);
    - ``controlnet``: a ControlNet copy of the UNet encoder that reads the landmark map (drawn at latent size
      times ``config.landmark_map_upscale``) and cross-attends over the identity tokens; its residuals are added to
      the UNet's skip connections, scaled by ``landmark_scale``.
    """

    def __init__(self, config: FaceSnapModelConfig, unet: UNet2DConditionModel,
                 controlnet: ControlNetModel | None = None) -> None:  # fmt: skip
        super().__init__()
        self.config = config
        cross = unet.config.cross_attention_dim
        if cross != config.cross_attention_dim:
            raise ValueError(f"UNet cross_attention_dim is {cross}, the modules expect {config.cross_attention_dim}")
        self.layer_names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
        modules = dict(unet.named_modules())
        self.processors = nn.ModuleDict(
            {_key(n): IdentityAttnProcessor(modules[n[: -len(".processor")]], cross) for n in self.layer_names}
        )
        if config.use_controlnet and controlnet is None:
            controlnet = ControlNetModel.from_unet(
                unet,
                conditioning_embedding_out_channels=config.controlnet_embedding_channels,
                conditioning_channels=config.landmark_channels,
            )
        self.controlnet = controlnet if config.use_controlnet else None

    def install(self, unet: UNet2DConditionModel) -> None:
        """Set this module's processors on ``unet``'s cross-attention layers (plain ones on the others)."""
        procs = {}
        for name in unet.attn_processors:
            procs[name] = self.processors[_key(name)] if name in self.layer_names else PlainAttnProcessor()
        unet.set_attn_processor(procs)

    def predict_noise(
        self,
        unet: UNet2DConditionModel,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        identity_tokens: torch.Tensor | None = None,
        landmark_map: torch.Tensor | None = None,
        identity_scale: float = 1.0,
        landmark_scale: float = 1.0,
    ) -> torch.Tensor:
        """The UNet's noise prediction with identity attention and the landmark branch (each skipped at scale 0).

        The ControlNet always attends over identity tokens, as in training; without any (identity scale 0) it gets
        zeroed ones, the input training gives it on identity dropout, never the text embeddings it has not seen.
        """
        down = mid = None
        if self.controlnet is not None and landmark_map is not None and landmark_scale > 0:
            context = identity_tokens
            if context is None:
                cfg = self.config
                context = latents.new_zeros(latents.shape[0], cfg.num_tokens, cfg.cross_attention_dim)
            down, mid = self.controlnet(
                latents,
                timesteps,
                encoder_hidden_states=context.to(latents.dtype),
                controlnet_cond=landmark_map.to(latents.dtype),
                conditioning_scale=landmark_scale,
                return_dict=False,
            )
        kwargs = None
        if identity_tokens is not None and identity_scale > 0:
            kwargs = {"identity_tokens": identity_tokens, "identity_scale": identity_scale}
        return unet(
            latents,
            timesteps,
            encoder_hidden_states=text_embeddings,
            cross_attention_kwargs=kwargs,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
