"""Face analysis: detection, 5-point keypoints, identity embeddings, behind one ``FaceAnalyzer`` interface."""

from stylid_core.faces.base import FACE_ANALYZERS, Face, FaceAnalyzer, size_bucket
from stylid_core.faces.factory import create_face_analyzer

__all__ = ["FACE_ANALYZERS", "Face", "FaceAnalyzer", "create_face_analyzer", "size_bucket"]
