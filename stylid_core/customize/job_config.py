"""Typed config of ``stylid customize`` (validated here; YAML is read in ``jobs/customize.py``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from stylid_core.config import IO_NOT_SEMANTIC, FacesConfig, IOConfig, StageResources, _check
from stylid_core.customize.facesnap.config import build_config


@dataclass
class CustomizeResources:
    """Workers of the three customize stages."""

    reference: StageResources = field(default_factory=lambda: StageResources(batch_size=4, num_cpus=1))
    generate: StageResources = field(default_factory=lambda: StageResources(batch_size=1, num_cpus=1, num_gpus=1))
    score: StageResources = field(default_factory=lambda: StageResources(batch_size=4, num_cpus=1))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, dict):
                base = dataclasses.asdict(f.default_factory())  # type: ignore[misc]
                setattr(self, f.name, build_config(StageResources, {**base, **value}, f"resources.{f.name}"))


@dataclass
class CustomizeJobConfig:
    """``stylid customize``: which customizer (``backend`` + its ``options``), faces, scoring, I/O, resources."""

    name: str = "customize"
    backend: str = "facesnap"  # facesnap | ip_adapter_faceid
    options: dict[str, Any] = field(default_factory=dict)  # the backend's config (FaceSnapConfig, ...)
    faces: FacesConfig = field(default_factory=FacesConfig)
    clip_model: str | None = None  # local CLIPModel folder: adds prompt/image agreement (clip_score)
    default_num_images: int = 1
    max_num_images: int = 16
    io: IOConfig = field(default_factory=IOConfig)
    resources: CustomizeResources = field(default_factory=CustomizeResources)

    def __post_init__(self) -> None:
        if isinstance(self.faces, dict):
            self.faces = build_config(FacesConfig, self.faces, "customize.faces")
        if isinstance(self.io, dict):
            self.io = build_config(IOConfig, self.io, "customize.io")
        if isinstance(self.resources, dict):
            self.resources = build_config(CustomizeResources, self.resources, "customize.resources")
        _check(self.backend in ("facesnap", "ip_adapter_faceid"), f"customize.backend unknown: {self.backend!r}")
        _check(isinstance(self.options, dict), "customize.options must be a mapping")
        _check(1 <= self.default_num_images <= self.max_num_images, "need 1 <= default_num_images <= max_num_images")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CustomizeJobConfig:
        return build_config(cls, data or {}, "customize")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """A short hash of what changes the outputs (not name, resources or credentials)."""
        d = self.to_dict()
        for key in ("name", "resources"):
            d.pop(key)
        # credentials, the output's layout and retry settings change no result
        for key in IO_NOT_SEMANTIC:
            d["io"].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]
