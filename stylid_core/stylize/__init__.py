"""Stylization engines behind the ``Stylizer`` interface, and the ``MosaicRestorer`` that wraps any of them."""

from stylid_core.stylize.base import STYLIZERS, Stylizer

__all__ = ["STYLIZERS", "Stylizer"]
