"""FaceSnap (arXiv 2602.00627): tuning-free portrait customization.

Modules: ``mixer`` (facial attribute mixer -> identity tokens), ``landmarks`` (landmark predictor, landmark maps),
``identity_module`` (decoupled identity cross-attention + landmark ControlNet), ``modules`` (all three, saved as
one safetensors file + JSON), ``engine`` (sampling), ``training`` (losses and a train step), ``customizer`` (the
``facesnap`` ``Customizer`` backend). Heavy imports happen when the backend is created, not at import.
"""

from __future__ import annotations

from typing import Any

from stylid_core.customize.base import CUSTOMIZERS, Customizer
from stylid_core.customize.facesnap.config import FaceSnapConfig, FaceSnapModelConfig, TinyComponentsConfig

__all__ = ["FaceSnapConfig", "FaceSnapModelConfig", "TinyComponentsConfig", "create_facesnap"]


@CUSTOMIZERS.register("facesnap")
def create_facesnap(config: FaceSnapConfig | dict[str, Any] | None = None, **overrides: Any) -> Customizer:
    """The ``facesnap`` customizer from a ``FaceSnapConfig`` or its dict form (``overrides`` replace keys)."""
    from stylid_core.customize.facesnap.customizer import FaceSnapCustomizer

    if isinstance(config, FaceSnapConfig):
        data = {f: getattr(config, f) for f in config.__dataclass_fields__}
    else:
        data = dict(config or {})
    data.update(overrides)
    return FaceSnapCustomizer(FaceSnapConfig.from_dict(data))
