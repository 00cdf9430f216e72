"""The ``Stylizer`` interface: (content, style, faces) -> stylized image of the content's size."""

from __future__ import annotations

import numpy as np

from stylid_core.faces.base import Face
from stylid_core.registry import Registry


class Stylizer:
    """Restyles a content image after a style image, keeping the content's geometry.

    ``faces`` are the faces of ``content`` in its own pixel coordinates; engines may use them (the diffusion
    engine's content consistency guidance does) or ignore them (the classical engine). The output has the
    content's height and width, RGB uint8.
    """

    #: registry name of the engine, recorded in every output row
    name: str = "abstract"
    #: a short human description of the model/weights that ran, for reports (e.g. "opencv-classical" or a path)
    model: str = ""
    #: engines that compute global statistics (colour transfer, AdaIN) set this and accept ``content_region``
    #: in ``stylize``: the (x0, y0, x1, y1) part of ``content`` that is the real image, the rest being a mosaic
    #: of upscaled faces whose statistics must not shift the style of the whole.
    accepts_content_region: bool = False

    def working_size(self, height: int, width: int) -> tuple[int, int]:
        """(H, W) the engine actually runs at for an input of ``height`` x ``width``.

        The default is the input's own size (engines that work at any resolution, such as the classical filters).
        Engines with a working resolution (the diffusion engine's ``resolution``, the neural engine's ``max_side``)
        override it; ``MosaicRestorer`` plans its canvas with it, so a face tile reaches ``target_face_px`` at the
        scale the engine runs at.
        """
        return height, width

    def stylize(
        self,
        content: np.ndarray,
        style: np.ndarray,
        faces: list[Face] | None = None,
        content_region: tuple[int, int, int, int] | None = None,
    ) -> np.ndarray:
        """Stylize one image: by default one call of ``stylize_batch`` (engines that batch implement only that).
        ``content_region`` goes on only to engines with ``accepts_content_region``."""
        self._check_implemented()
        if self.accepts_content_region:
            return self.stylize_batch([content], [style], [faces or []], content_regions=[content_region])[0]
        return self.stylize_batch([content], [style], [faces or []])[0]

    def _check_implemented(self) -> None:
        cls = type(self)
        if cls.stylize is Stylizer.stylize and cls.stylize_batch is Stylizer.stylize_batch:
            raise TypeError(
                f"{cls.__name__} implements neither stylize nor stylize_batch (each derives from the other)"
            )

    def stylize_batch(
        self,
        contents: list[np.ndarray],
        styles: list[np.ndarray],
        faces: list[list[Face]] | None = None,
        content_regions: list[tuple[int, int, int, int] | None] | None = None,
    ) -> list[np.ndarray]:
        """Stylize many images: by default ``stylize`` once per image; engines that batch override this.

        ``content_regions`` is passed on (one per content) only to engines with ``accepts_content_region``.
        """
        self._check_implemented()
        faces = faces if faces is not None else [[] for _ in contents]
        if self.accepts_content_region and content_regions is not None:
            return [
                self.stylize(c, s, f, content_region=r)  # type: ignore[call-arg]
                for c, s, f, r in zip(contents, styles, faces, content_regions)
            ]
        return [self.stylize(c, s, f) for c, s, f in zip(contents, styles, faces)]


class StylizerWrapper(Stylizer):
    """A step around an engine (the mosaic, the face detail transfer): it reports the wrapped engine's ``name`` and
    ``model``, so every output row records the engine that ran, whatever steps surround it."""

    def __init__(self, stylizer: Stylizer) -> None:
        self.stylizer = stylizer
        self.name = stylizer.name
        self.model = stylizer.model


STYLIZERS: Registry[Stylizer] = Registry(
    "stylizer",
    modules={
        "classical": "stylid_core.stylize.classical",
        "identity": "stylid_core.stylize.classical",
        "diffusion": "stylid_core.stylize.diffusion",
        "neural": "stylid_core.stylize.neural",
    },
)
