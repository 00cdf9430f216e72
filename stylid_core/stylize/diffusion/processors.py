"""Attention processors for StyleID's injection, installed with diffusers' ``set_attn_processor``.

A ``StyleInjectionProcessor`` replaces the stock SDPA processor of one decoder self-attention layer. It is a plain
callable with the stock signature and does the stock computation unless the shared ``InjectionState`` says
otherwise:

- ``mode == "record"``: compute as stock, and keep this layer's projected queries/keys/values - used while
  DDIM-inverting the style and the content images;
- ``mode == "inject"``: keys/values come from the style's recording at the same timestep, the query is blended
  with the content's recorded query (query preservation, with a per-token gamma raised inside the face mask),
  the logits are multiplied by the temperature, and optionally content keys/values are appended for query tokens
  inside the face mask (content-attention reweighting).

Every UNet call is bracketed by ``InjectionState.stage()`` and ``InjectionState.collect()`` (the engine does it,
outside any compiled graph): ``stage`` looks up each layer's features of the current timestep, ``collect`` files
what record mode kept under the current timestep. Inside the UNet the processors only read and write plain
per-layer slots, never a timestep-keyed dict, so ``torch.compile`` captures a whole UNet call as one graph per
mode and shape, with no graph break and no recompilation per timestep or per style.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

Features = dict[str, dict[int, torch.Tensor]]  # layer name -> timestep -> (B, tokens, channels)


@dataclass
class InjectionState:
    """What every ``StyleInjectionProcessor`` reads: the mode, the timestep and the recorded features.

    ``record_keys`` names what is kept while recording (``"q"``, ``"k"``, ``"v"``). In ``inject`` mode,
    ``style_k``/``style_v`` ((1 or B, Ns, C) per layer and timestep) and ``content_q`` ((B, N, C)) are used as
    switched on; ``gamma``/``face_gamma``/``temperature`` as in ``DiffusionConfig``. ``face_mask`` is the (B, 1, h, w)
    mask at latent resolution or ``None``. ``on_inject`` (tests) is called with (layer, timestep, q, k, v) after
    the injected tensors are assembled (a Python callback: under ``torch.compile`` it breaks the graph).
    ``layers`` lists the processors' layers (set by ``install_processors``).
    """

    mode: str = "off"  # off | record | inject
    timestep: int = -1  # the UNet's timestep; recordings are stored under it
    feature_timestep: int = -1  # inject mode: the recorded timestep whose features are used
    record_keys: tuple[str, ...] = ()
    recorded: dict[str, Features] = field(default_factory=dict)
    style_k: Features | None = None
    style_v: Features | None = None
    content_q: Features | None = None
    content_k: Features | None = None
    content_v: Features | None = None
    gamma: float | None = 0.75  # None = no query preservation
    face_gamma: float | None = None  # None = no per-token gamma inside the mask
    temperature: float = 1.0
    content_kv_weight: float = 0.0
    face_mask: torch.Tensor | None = None
    feature_dtype: torch.dtype | None = None
    on_inject: Callable[..., None] | None = None
    layers: list[str] = field(default_factory=list)
    #: per UNet call: layer -> the features injected in it ("q", "k", "v", "content_k", "content_v"); set by stage()
    staged: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    #: per UNet call: layer -> what record mode kept ("q", "k", "v"); filed under the timestep by collect()
    captured: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def reset_recording(self, keys: tuple[str, ...]) -> None:
        self.record_keys = keys
        self.recorded = {k: {} for k in keys}

    def stage(self) -> None:
        """Before a UNet call: put each layer's features of ``feature_timestep`` where its processor reads them."""
        self.staged.clear()
        self.captured.clear()
        if self.mode != "inject":
            return
        t = self.feature_timestep
        sources = {
            "q": self.content_q if self.gamma is not None else None,
            "k": self.style_k if self.style_v is not None else None,
            "v": self.style_v if self.style_k is not None else None,
            "content_k": self.content_k if self.content_kv_weight > 0 and self.content_v is not None else None,
            "content_v": self.content_v if self.content_kv_weight > 0 and self.content_k is not None else None,
        }
        for layer in self.layers:
            self.staged[layer] = {name: feats[layer][t] for name, feats in sources.items() if feats is not None}

    def collect(self) -> None:
        """After a UNet call: file what record mode kept under ``timestep``."""
        for layer, kept in self.captured.items():
            for name, tensor in kept.items():
                self.recorded[name].setdefault(layer, {})[self.timestep] = tensor
        self.captured.clear()
        self.staged.clear()

    def set_face_mask(self, mask: torch.Tensor | None) -> None:
        self.face_mask = mask

    def token_mask(self, n_tokens: int) -> torch.Tensor | None:
        """The face mask resized to a layer with ``n_tokens`` tokens, as (B, n_tokens, 1)."""
        if self.face_mask is None:
            return None
        h, w = self.face_mask.shape[-2:]
        factor = math.sqrt(h * w / n_tokens)
        size = (max(1, round(h / factor)), max(1, round(w / factor)))
        if size[0] * size[1] != n_tokens:
            raise RuntimeError(f"cannot map a {h}x{w} face mask onto {n_tokens} attention tokens")
        resized = F.interpolate(self.face_mask.float(), size=size, mode="area")
        return resized.flatten(2).transpose(1, 2)


def _batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t.expand(batch, -1, -1) if t.shape[0] == 1 and batch > 1 else t


class StyleInjectionProcessor:
    """SDPA self-attention with StyleID key/value injection, query preservation and attention temperature."""

    def __init__(self, layer: str, state: InjectionState) -> None:
        self.layer = layer
        self.state = state

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        state = self.state
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        scale = None
        if state.mode == "record":
            self._record(query, key, value)
        elif state.mode == "inject":
            query, key, value, attention_mask, scale = self._inject(attn, query, key, value, attention_mask)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        q_batch = query.shape[0]
        query = query.view(q_batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(q_batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(q_batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if scale is None:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
            )
        else:
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False, scale=scale
            )
        hidden_states = hidden_states.transpose(1, 2).reshape(q_batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _record(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        state = self.state
        kept = {}
        for name, tensor in (("q", query), ("k", key), ("v", value)):
            if name in state.record_keys:
                tensor = tensor.detach()
                if state.feature_dtype is not None:
                    tensor = tensor.to(state.feature_dtype)
                kept[name] = tensor.clone()
        state.captured[self.layer] = kept

    def _inject(self, attn, query, key, value, attention_mask):
        state = self.state
        staged = state.staged[self.layer]
        batch, n_tokens, _ = query.shape
        dtype = query.dtype
        mask = state.token_mask(n_tokens)
        if "q" in staged:
            q_content = staged["q"].to(dtype)
            gamma: float | torch.Tensor = state.gamma  # type: ignore[assignment]
            if mask is not None and state.face_gamma is not None:
                gamma = (state.gamma + (state.face_gamma - state.gamma) * mask).to(dtype)
            query = gamma * q_content + (1 - gamma) * query
        if "k" in staged:
            key = _batch(staged["k"].to(dtype), batch)
            value = _batch(staged["v"].to(dtype), batch)
        if mask is not None and "content_k" in staged:
            k_content = staged["content_k"].to(dtype)
            v_content = staged["content_v"].to(dtype)
            n_style = key.shape[1]
            key = torch.cat([key, k_content], dim=1)
            value = torch.cat([value, v_content], dim=1)
            # bias (B, 1, N, Ns + Nc): 0 for the style keys; log(w * mask) for the content keys
            content_bias = torch.log(state.content_kv_weight * mask.clamp(min=0)).to(dtype)  # (B, N, 1)
            content_bias = content_bias.clamp(min=torch.finfo(dtype).min / 2)
            style_bias = torch.zeros(batch, n_tokens, n_style, dtype=dtype, device=query.device)
            bias = torch.cat([style_bias, content_bias.expand(-1, -1, k_content.shape[1])], dim=2).unsqueeze(1)
            attention_mask = bias if attention_mask is None else attention_mask + bias
        scale = None
        if state.temperature != 1.0:
            scale = state.temperature / math.sqrt(key.shape[-1] // attn.heads)
        if state.on_inject is not None:
            state.on_inject(self.layer, state.feature_timestep, query, key, value)
        return query, key, value, attention_mask, scale


def default_layers(unet) -> list[str]:
    """The last two up blocks that carry attention (SD: ``up_blocks.2``, ``up_blocks.3``; StyleID's layers 6-11)."""
    blocks = sorted(
        {".".join(name.split(".")[:2]) for name in unet.attn_processors if name.startswith("up_blocks.")},
        key=lambda b: int(b.split(".")[1]),
    )
    return blocks[-2:]


def select_layers(unet, prefixes: list[str]) -> list[str]:
    """Processor names of the decoder self-attention (``attn1``) layers under the given module-name prefixes."""
    names = [n for n in unet.attn_processors if ".attn1." in n]
    chosen = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in prefixes)]
    if not chosen:
        raise ValueError(
            f"diffusion option 'layers' {prefixes!r} matches no self-attention layer; "
            f"candidates: {sorted({'.'.join(n.split('.')[:2]) for n in names})}"
        )
    return chosen


def install_processors(unet, layers: list[str], state: InjectionState) -> dict[str, StyleInjectionProcessor]:
    """Put a ``StyleInjectionProcessor`` on each named layer; every other layer keeps its processor."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = {}
    mapping = {}
    for name, proc in unet.attn_processors.items():
        if name in layers:
            layer = name.removesuffix(".processor")
            procs[layer] = StyleInjectionProcessor(layer, state)
            mapping[name] = procs[layer]
        else:
            mapping[name] = proc if proc is not None else AttnProcessor2_0()
    unet.set_attn_processor(mapping)
    state.layers = list(procs)
    return procs
