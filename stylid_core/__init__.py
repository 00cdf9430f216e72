"""stylid_core: the library behind stylid (no Ray here).

Image decoding, face analysis backends, identity metrics, stylization and customization engines, reports.
"""

__version__ = "0.1.0"
