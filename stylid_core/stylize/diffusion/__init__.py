"""The diffusion stylization engine (StyleID + content consistency guidance), registered as ``"diffusion"``.

Heavy imports (diffusers, transformers) happen when the engine is created, not when this package is imported.
"""

from __future__ import annotations

from stylid_core.stylize.base import STYLIZERS, Stylizer
from stylid_core.stylize.diffusion.config import DiffusionConfig


@STYLIZERS.register("diffusion")
def create_diffusion_stylizer(**options) -> Stylizer:
    """Factory for ``STYLIZERS.create("diffusion", **stylize.options)``; see ``DiffusionConfig`` for the options."""
    from stylid_core.stylize.diffusion.engine import DiffusionStylizer

    return DiffusionStylizer(**options)


__all__ = ["DiffusionConfig", "create_diffusion_stylizer"]
