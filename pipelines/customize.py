"""``stylid customize`` on Ray Data: reference rows -> faces -> portraits (GPU actor pool) -> scores -> outputs.

Manifest columns: ``reference_uri``, ``prompt``, optional ``image_id``, ``pose_uri``, ``num_images``. Every row
comes out once in ``metrics.parquet`` with ``status`` (``ok`` or a reason) and ``error``; generated images go to
``<output>/images/<image_id>-<k>.png`` (one put each); ``run.json`` and ``_SUCCESS`` are written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import ray
from ray.data import ActorPoolStrategy

from stylid_core.config import StageResources
from stylid_core.customize.base import CUSTOMIZERS
from stylid_core.customize.job_config import CustomizeJobConfig
from stylid_core.faces.base import Face
from stylid_core.faces.factory import create_face_analyzer
from stylid_core.imageio import ImageDecodeError, decode_image, encode_png
from stylid_core.metrics import identity_similarity

#: per-row metrics columns and their pandas dtypes (fixed so all-null batches still concatenate)
METRIC_COLUMNS: dict[str, str] = {
    "image_id": "string",
    "reference_uri": "string",
    "pose_uri": "string",
    "prompt": "string",
    "num_images": "Int32",
    "status": "string",
    "error": "string",
    "backend": "string",
    "model": "string",
    "n_generated": "Int32",
    "n_faces_found": "Int32",
    "id_sim_mean": "Float64",
    "id_sim_max": "Float64",
    "id_match_rate": "Float64",
    "clip_score_mean": "Float64",
    "output_uris": "string",  # JSON list
    "t_reference": "Float64",
    "t_generate": "Float64",
    "t_score": "Float64",
}


def _decode_png(data: bytes) -> np.ndarray:
    return decode_image(bytes(data))


def _read_image(uri: str, config: CustomizeJobConfig) -> np.ndarray:
    try:
        with fsspec.open(uri, "rb", **config.io.storage_options) as f:
            data = f.read(config.io.max_bytes + 1)
    except FileNotFoundError as exc:
        raise ImageDecodeError("missing", f"{uri}: not found") from exc
    except PermissionError as exc:
        raise ImageDecodeError("forbidden", f"{uri}: {exc}") from exc
    if len(data) > config.io.max_bytes:
        raise ImageDecodeError("too_large", f"{uri}: more than {config.io.max_bytes} bytes")
    return decode_image(data, max_pixels=config.io.max_pixels, max_bytes=config.io.max_bytes)


def _fail(df: pd.DataFrame, i: int, status: str, error: str) -> None:
    df.at[i, "status"] = status
    df.at[i, "error"] = error[:2000]


class PrepareCustomizeRows:
    """Manifest rows -> the record: ``image_id`` derived when absent, defaults filled, every column present."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.reset_index(drop=True).copy()
        for col in ("image_id", "pose_uri", "num_images", "prompt"):
            if col not in df:
                df[col] = None
        df["image_id"] = [
            str(i) if isinstance(i, str) and i else hashlib.sha256(f"{u}|{p}".encode()).hexdigest()[:16]
            for i, u, p in zip(df["image_id"], df["reference_uri"], df["prompt"])
        ]
        n = pd.to_numeric(df["num_images"], errors="coerce").fillna(self.config.default_num_images).astype(int)
        df["num_images"] = n.clip(1, self.config.max_num_images)
        df["prompt"] = df["prompt"].fillna("").astype(str)
        df["status"] = "ok"
        df["error"] = None
        df["backend"] = self.config.backend
        for col in ("model", "output_uris"):
            df[col] = None
        df["ref_png"] = None
        df["pose_png"] = None
        df["face_json"] = None
        df["out_pngs"] = None
        return df


class ReferenceStage:
    """CPU stage: load the reference (and pose) image, find the largest face, embed it."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.analyzer = create_face_analyzer(config.faces)

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        t = []
        for i in range(len(df)):
            t0 = time.perf_counter()
            try:
                image = _read_image(str(df.at[i, "reference_uri"]), self.config)
                faces = self.analyzer.analyze(image, max_faces=1)
                if not faces:
                    _fail(df, i, "no_face", "no face in the reference image")
                else:
                    face = faces[0]
                    d = face.to_dict()
                    if face.landmarks is not None:
                        d["landmarks"] = np.asarray(face.landmarks, float).tolist()
                    df.at[i, "face_json"] = json.dumps(d)
                    df.at[i, "ref_png"] = encode_png(image)
                pose = df.at[i, "pose_uri"]
                if isinstance(pose, str) and pose and df.at[i, "status"] == "ok":
                    df.at[i, "pose_png"] = encode_png(_read_image(pose, self.config))
            except ImageDecodeError as exc:
                _fail(df, i, exc.status, str(exc))
            except Exception as exc:  # a bad row is an error row, never a crashed job
                _fail(df, i, "reference_error", f"{type(exc).__name__}: {exc}")
            t.append(time.perf_counter() - t0)
        df["t_reference"] = t
        return df


class CustomizeStage:
    """GPU actor stage: the configured ``Customizer`` generates ``num_images`` portraits per ok row."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.customizer = CUSTOMIZERS.create(config.backend, config=dict(config.options))

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        times = []
        for i in range(len(df)):
            t0 = time.perf_counter()
            df.at[i, "model"] = self.customizer.model
            if df.at[i, "status"] == "ok":
                try:
                    face_d = json.loads(df.at[i, "face_json"])
                    face = Face.from_dict(face_d)
                    if face_d.get("landmarks") is not None:
                        face.landmarks = np.asarray(face_d["landmarks"], np.float32)
                    pose = df.at[i, "pose_png"]
                    pose = pose if isinstance(pose, (bytes, bytearray, memoryview)) else None  # null: no pose
                    images = self.customizer.generate(
                        _decode_png(df.at[i, "ref_png"]), face, str(df.at[i, "prompt"]),
                        num_images=int(df.at[i, "num_images"]),
                        pose=None if pose is None else _decode_png(pose),
                        seed=int(hashlib.sha256(str(df.at[i, "image_id"]).encode()).hexdigest()[:8], 16),
                    )  # fmt: skip
                    df.at[i, "out_pngs"] = [encode_png(img) for img in images]
                except Exception as exc:
                    _fail(df, i, "generate_error", f"{type(exc).__name__}: {exc}")
            times.append(time.perf_counter() - t0)
        df["t_generate"] = times
        return df


class CustomizeScoreStage:
    """Identity similarity of each generated face to the reference (and CLIP prompt agreement when configured)."""

    def __init__(self, config: CustomizeJobConfig) -> None:
        self.config = config
        self.analyzer = create_face_analyzer(config.faces)
        self.clip = None
        if config.clip_model:
            from transformers import CLIPModel, CLIPProcessor

            self.clip = (CLIPModel.from_pretrained(config.clip_model).eval(),
                         CLIPProcessor.from_pretrained(config.clip_model))  # fmt: skip

    def _clip_score(self, images: list[np.ndarray], prompt: str) -> float:
        import torch

        model, proc = self.clip
        with torch.no_grad():
            inputs = proc(text=[prompt], images=images, return_tensors="pt", padding=True)
            out = model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds, dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return float((100 * (img @ txt.T)).clamp_min(0).mean())

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        cols = {c: [None] * len(df) for c in ("n_generated", "n_faces_found", "id_sim_mean", "id_sim_max",
                                              "id_match_rate", "clip_score_mean", "t_score")}  # fmt: skip
        for i in range(len(df)):
            t0 = time.perf_counter()
            pngs = df.at[i, "out_pngs"]
            if df.at[i, "status"] == "ok" and pngs is not None:
                try:
                    ref = json.loads(df.at[i, "face_json"])["embedding"]
                    images = [_decode_png(p) for p in pngs]
                    sims, matches = [], []
                    for img in images:
                        faces = self.analyzer.analyze(img, max_faces=1)
                        if faces and faces[0].embedding is not None:
                            emb = faces[0].embedding
                            sims.append(identity_similarity(emb, np.asarray(ref, np.float32)))
                            matches.append(self.analyzer.distance(emb, ref) < self.analyzer.match_threshold)
                    cols["n_generated"][i] = len(images)
                    cols["n_faces_found"][i] = len(sims)
                    if sims:
                        cols["id_sim_mean"][i] = float(np.mean(sims))
                        cols["id_sim_max"][i] = float(np.max(sims))
                    # a generated image without a recognisable face counts as a miss
                    cols["id_match_rate"][i] = float(np.sum(matches)) / len(images)
                    if self.clip is not None:
                        cols["clip_score_mean"][i] = self._clip_score(images, str(df.at[i, "prompt"]))
                except Exception as exc:
                    _fail(df, i, "score_error", f"{type(exc).__name__}: {exc}")
            cols["t_score"][i] = time.perf_counter() - t0
        for c, v in cols.items():
            df[c] = v
        return df


class CustomizeWriteStage:
    """Writes each generated image in one put; keeps only the metrics columns."""

    def __init__(self, output_uri: str, config: CustomizeJobConfig) -> None:
        self.output_uri = output_uri.rstrip("/")
        self.config = config
        self.suffix = config.config_hash()

    def __call__(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        for i in range(len(df)):
            pngs = df.at[i, "out_pngs"]
            if pngs is None or df.at[i, "status"] != "ok":
                continue
            uris = []
            try:
                for k, png in enumerate(pngs):
                    uri = f"{self.output_uri}/images/{df.at[i, 'image_id']}-{self.suffix}-{k}.png"
                    with fsspec.open(uri, "wb", **self.config.io.storage_options) as f:
                        f.write(bytes(png))
                    uris.append(uri)
                df.at[i, "output_uris"] = json.dumps(uris)
            except Exception as exc:
                _fail(df, i, "write_error", f"{type(exc).__name__}: {exc}")
        out = pd.DataFrame({c: df[c] if c in df else None for c in METRIC_COLUMNS})
        return out.astype(METRIC_COLUMNS)


def _pool(res: StageResources) -> dict[str, Any]:
    size = res.pool_size or 1
    return {"compute": ActorPoolStrategy(size=size), "num_cpus": res.num_cpus, "num_gpus": res.num_gpus or None,
            "batch_size": res.batch_size}  # fmt: skip


def build_customize_dataset(config: CustomizeJobConfig, manifest_uri: str, output_uri: str) -> ray.data.Dataset:
    """The lazy dataset of metrics rows (images are written as a side effect of its last stage)."""
    fs, path = fsspec.core.url_to_fs(manifest_uri, **config.io.storage_options)
    ds = ray.data.read_parquet(path, filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(fs)))
    r = config.resources
    gen = {k: v for k, v in _pool(r.generate).items() if v is not None}
    return (
        ds.map_batches(PrepareCustomizeRows(config), batch_format="pandas", batch_size=64, num_cpus=0.1)
        .map_batches(ReferenceStage, fn_constructor_args=(config,), batch_format="pandas", **_pool(r.reference))
        .map_batches(CustomizeStage, fn_constructor_args=(config,), batch_format="pandas", **gen)
        .map_batches(CustomizeScoreStage, fn_constructor_args=(config,), batch_format="pandas", **_pool(r.score))
        .map_batches(CustomizeWriteStage(output_uri, config), batch_format="pandas", batch_size=8, num_cpus=0.1)
    )  # fmt: skip


@dataclass
class CustomizeResult:
    rows: int
    counts: dict[str, int]
    seconds: float
    metrics_uri: str

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "counts": self.counts, "seconds": round(self.seconds, 3),
                "metrics_uri": self.metrics_uri}  # fmt: skip


def run_customize(config: CustomizeJobConfig, manifest_uri: str, output_uri: str) -> CustomizeResult:
    """Run the job; write ``metrics.parquet``, ``run.json`` and ``_SUCCESS`` (last) under ``output_uri``."""
    t0 = time.perf_counter()
    ds = build_customize_dataset(config, manifest_uri, output_uri)
    parts = [b for b in ds.iter_batches(batch_format="pandas", batch_size=256)]  # metrics rows only: small
    metrics = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(METRIC_COLUMNS))
    metrics = metrics.sort_values("image_id").reset_index(drop=True)
    out = output_uri.rstrip("/")
    buf = io.BytesIO()
    metrics.to_parquet(buf, index=False)
    opts = config.io.storage_options
    with fsspec.open(f"{out}/metrics.parquet", "wb", **opts) as f:
        f.write(buf.getvalue())
    counts = {str(k): int(v) for k, v in metrics["status"].value_counts().items()}
    result = CustomizeResult(len(metrics), counts, time.perf_counter() - t0, f"{out}/metrics.parquet")
    run = {"job": "customize", "config": config.to_dict(), "config_hash": config.config_hash(),
           "manifest": manifest_uri, **result.to_dict()}  # fmt: skip
    run["config"]["io"].pop("storage_options", None)
    with fsspec.open(f"{out}/run.json", "w", **opts) as f:
        json.dump(run, f, indent=2, default=str)
    with fsspec.open(f"{out}/_SUCCESS", "w", **opts) as f:
        f.write("")
    return result
