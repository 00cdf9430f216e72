"""Build the configured ``FaceAnalyzer``."""

from __future__ import annotations

from stylid_core.config import FacesConfig
from stylid_core.faces.base import FACE_ANALYZERS, FaceAnalyzer


def create_face_analyzer(config: FacesConfig) -> FaceAnalyzer:
    """The backend named by ``config.backend``, built from the rest of ``config``.

    Each backend's factory takes the whole ``FacesConfig`` and reads the fields that concern it.
    """
    return FACE_ANALYZERS.create(config.backend, config=config)
