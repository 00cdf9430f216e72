"""Facial attribute mixer: CLIP patch tokens (low-level) + recognition embedding (high-level) -> identity tokens."""

from __future__ import annotations

import torch
from torch import nn

from stylid_core.customize.facesnap.config import FaceSnapModelConfig


class MixerBlock(nn.Module):
    """Queries attend over [patch tokens; queries] (perceiver-style), then a feed-forward layer."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_kv = nn.LayerNorm(dim)
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        q = self.norm_q(queries)
        kv = torch.cat([self.norm_kv(patches), q], dim=1)
        queries = queries + self.attn(q, kv, kv, need_weights=False)[0]
        return queries + self.ff(self.norm_ff(queries))


class FacialAttributeMixer(nn.Module):
    """Fuses the aligned face crop's CLIP patch tokens with the face-recognition embedding into identity tokens.

    The queries are learned latents shifted by a projection of the (L2-normalised) recognition embedding, so the
    high-level identity decides what is looked up among the low-level patch features (hair, skin, accessories).
    The recognition embedding is also added to the output, which keeps identity in the tokens even when the crop
    carries little (small, blurred faces).
    """

    def __init__(self, config: FaceSnapModelConfig) -> None:
        super().__init__()
        self.config = config
        dim, n = config.mixer_dim, config.num_tokens
        self.latents = nn.Parameter(torch.randn(1, n, dim) * dim**-0.5)
        self.embed_to_queries = nn.Sequential(
            nn.Linear(config.face_embed_dim, dim), nn.GELU(), nn.Linear(dim, n * dim)
        )
        self.patch_in = nn.Linear(config.clip_dim, dim)
        self.blocks = nn.ModuleList(MixerBlock(dim, config.mixer_heads) for _ in range(config.mixer_depth))
        self.proj_out = nn.Linear(dim, config.cross_attention_dim)
        self.norm_out = nn.LayerNorm(config.cross_attention_dim)

    def forward(self, patch_tokens: torch.Tensor, face_embedding: torch.Tensor) -> torch.Tensor:
        """``patch_tokens`` (B, N, clip_dim), ``face_embedding`` (B, face_embed_dim) -> (B, num_tokens, cross_dim)."""
        b = patch_tokens.shape[0]
        if face_embedding.shape != (b, self.config.face_embed_dim):
            raise ValueError(
                f"face embedding must be (batch, {self.config.face_embed_dim}), got {tuple(face_embedding.shape)}"
            )
        emb = nn.functional.normalize(face_embedding.to(patch_tokens.dtype), dim=-1)
        id_queries = self.embed_to_queries(emb).view(b, self.config.num_tokens, self.config.mixer_dim)
        queries = self.latents.expand(b, -1, -1) + id_queries
        patches = self.patch_in(patch_tokens)
        for block in self.blocks:
            queries = block(queries, patches)
        return self.norm_out(self.proj_out(queries + id_queries))
