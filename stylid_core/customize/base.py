"""The ``Customizer`` interface: (reference photo, prompt) -> new portraits of the same person."""

from __future__ import annotations

import abc

import numpy as np

from stylid_core.faces.base import Face
from stylid_core.registry import Registry


class Customizer(abc.ABC):
    """Generates portraits of the person in a reference photo, following a text prompt, with no tuning."""

    name: str = "abstract"
    model: str = ""

    @abc.abstractmethod
    def generate(
        self,
        reference: np.ndarray,
        reference_face: Face,
        prompt: str,
        num_images: int = 1,
        pose: np.ndarray | None = None,
        seed: int = 0,
    ) -> list[np.ndarray]:
        """``num_images`` RGB uint8 images of the reference's identity; ``pose`` is an optional driving image."""


CUSTOMIZERS: Registry[Customizer] = Registry(
    "customizer",
    modules={
        "facesnap": "stylid_core.customize.facesnap",
        "ip_adapter_faceid": "stylid_core.customize.ip_adapter_faceid",
    },
)
