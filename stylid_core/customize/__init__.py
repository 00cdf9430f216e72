"""Tuning-free portrait customization engines behind the ``Customizer`` interface."""

from stylid_core.customize.base import CUSTOMIZERS, Customizer

__all__ = ["CUSTOMIZERS", "Customizer"]
