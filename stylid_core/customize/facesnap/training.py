"""FaceSnap training: configs, (reference, target) pair extraction, the training model and its checkpoints.

Framework-free (no Ray): ``pipelines/train_customizer.py`` runs ``FaceSnapTrainer`` under Ray Train.
"""

from __future__ import annotations

import dataclasses
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from torch import nn

from stylid_core.config import FacesConfig, _check
from stylid_core.customize.facesnap.components import SDComponents, load_components, tiny_components
from stylid_core.customize.facesnap.config import FaceSnapModelConfig, TinyComponentsConfig, build_config
from stylid_core.customize.facesnap.engine import clip_pixels, tiny_model_config
from stylid_core.customize.facesnap.faceprep import DlibLandmarks68, align_face, relative_landmarks, to_square
from stylid_core.customize.facesnap.landmarks import (
    keypoints5_from_68,
    landmark_loss,
    pose_angles_from_landmarks,
    render_landmark_map,
)
from stylid_core.customize.facesnap.modules import FaceSnapModules, read_facesnap, save_facesnap

TRAIN_STATE_NAME = "train_state.pt"


@dataclass
class FaceSnapTrainConfig:
    """``stylid train-customizer``: data, model, optimisation, checkpoints and scaling."""

    manifest: str = ""  # Parquet manifest (any fsspec URI) with one face image per row
    storage_path: str = ""  # checkpoints go to <storage_path>/<name>/ (any fsspec URI)
    name: str = "facesnap"
    image_column: str = "image_uri"
    caption_column: str | None = "caption"  # used when the manifest has it, else default_caption
    # used when the manifest has it: a pair's reference comes from another photo of the same person where there is one
    person_column: str | None = "person_id"
    default_caption: str = "a photo of a person"
    base_model: str | None = None
    image_encoder: str | None = None
    tiny: TinyComponentsConfig | None = None
    model: FaceSnapModelConfig | None = None  # default: sized to the components (tiny) or the SD 1.5 defaults
    faces: FacesConfig | None = None  # None: dlib (HOG + 68 landmarks + 128-d embedding) built in
    resolution: int = 512
    batch_size: int = 4
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    max_steps: int = 1000
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    landmark_loss_weight: float = 1.0
    caption_dropout: float = 0.05
    identity_dropout: float = 0.05  # trains the unconditional branch used by classifier-free guidance
    pose_angle_prob: float = 0.3  # fraction of steps driven by (yaw, pitch, roll) instead of driving landmarks
    driver_shape_jitter: float = 0.03  # driving landmarks are perturbed by this fraction of the face radius
    reference_rotation_deg: float = 20.0  # reference augmentation
    reference_scale_range: float = 0.15
    grad_clip: float = 1.0
    mixed_precision: str = "no"  # no | fp16 | bf16 (CUDA only)
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    pair_cpus: float = 1.0  # CPUs per pair-extraction actor (Ray Data); leave room for the train workers
    pair_actors: int = 1
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.tiny, dict):
            self.tiny = build_config(TinyComponentsConfig, self.tiny, "train.tiny")
        if isinstance(self.model, dict):
            self.model = FaceSnapModelConfig.from_dict(self.model)
        if isinstance(self.faces, dict):
            self.faces = build_config(FacesConfig, self.faces, "train.faces")
        _check(bool(self.manifest), "train.manifest (a Parquet URI) is required")
        _check(bool(self.storage_path), "train.storage_path (any fsspec URI) is required")
        _check(self.tiny is not None or bool(self.base_model), "train needs base_model or tiny settings")
        _check(self.tiny is not None or bool(self.image_encoder), "train needs image_encoder (CLIP vision)")
        _check(self.batch_size >= 1 and self.max_steps >= 1, "train.batch_size and max_steps must be >= 1")
        _check(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoint_every/keep must be >= 1")
        _check(self.learning_rate > 0, "train.learning_rate must be > 0")
        _check(self.mixed_precision in ("no", "fp16", "bf16"), "train.mixed_precision must be no, fp16 or bf16")
        for name in ("caption_dropout", "identity_dropout", "pose_angle_prob"):
            _check(0 <= getattr(self, name) <= 1, f"train.{name} must be in [0, 1]")
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.pair_cpus > 0 and self.pair_actors >= 1, "train.pair_cpus must be > 0, pair_actors >= 1")
        if self.tiny is not None:
            self.resolution = self.tiny.sample_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaceSnapTrainConfig:
        return build_config(cls, data, "train")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.model is not None:
            d["model"] = self.model.to_dict()
        return d


# ---- data ------------------------------------------------------------------------------------------------------
def _no_person(person: Any) -> bool:
    return person is None or (isinstance(person, float) and math.isnan(person)) or str(person) == ""


def person_keys(persons: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A manifest's person column as string keys (one per row), null for a row without a person (null, NaN or
    empty). Two rows are the same person when their keys are equal."""
    col = persons
    if pa.types.is_floating(col.type):
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    keys = col.cast(pa.string())
    return pc.if_else(pc.equal(keys, ""), pa.scalar(None, pa.string()), keys)


def _changes(values: pa.Array) -> np.ndarray:
    """True where a sorted array's value differs from the one before (and at the first)."""
    if len(values) == 0:
        return np.zeros(0, bool)
    differs = pc.not_equal(values.slice(1), values.slice(0, len(values) - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[True], differs])


def _draw(seed: int, uri: str, choices: int) -> int:
    """The reference's place among a photo's ``choices`` others: seeded by ``seed`` and the photo's URI."""
    return int(np.random.default_rng(zlib.crc32(f"{seed}:reference:{uri}".encode())).integers(choices))


#: photos whose reference is drawn per Python round (their URIs as Python strings at once)
_DRAW_CHUNK = 65_536


def cross_photo_reference_array(
    uris: pa.Array | pa.ChunkedArray, persons: pa.Array | pa.ChunkedArray, seed: int
) -> pa.Array | pa.ChunkedArray:
    """For each row (photo ``uris[i]``, no nulls, of the person keyed ``persons[i]``: ``person_keys``), the photo
    its training reference comes from; vectorised in Arrow and numpy (arrays or chunked arrays).

    A person with several distinct photos gets, for each of them, another of their photos, drawn from ``seed``
    and the photo's URI (so the choice does not depend on the manifest's row order); a person with one photo, and
    a row without a person, keep their own photo. The rows are sorted by (person, photo) once: each person's
    distinct photos are then a run of that order, and the reference is the draw-th of the run without the photo
    itself. Only the draw, one seeded generator per distinct photo (about 12 us), is Python."""
    with_person = len(persons) - persons.null_count
    if not with_person:
        return uris
    # rows without a person sort last: the first ``with_person`` of the order are the rows that have one
    keys = [("p", "ascending", "at_end"), ("u", "ascending", "at_end")]
    order = pc.sort_indices(pa.table({"p": persons, "u": uris}), sort_keys=keys)
    order = order.slice(0, with_person)
    new_person = _changes(persons.take(order))
    photos = uris.take(order)
    new_photo = new_person | _changes(photos)
    photo_of_row = np.cumsum(new_photo) - 1  # each sorted row's distinct (person, photo)
    first = np.flatnonzero(new_photo)
    distinct = photos.take(pa.array(first))  # sorted by person, then photo
    del photos
    person_starts = np.flatnonzero(new_person[first])  # where each person's run of distinct photos begins
    person = np.cumsum(new_person[first]) - 1
    others = np.diff(np.append(person_starts, len(first)))[person] - 1
    own = np.arange(len(first)) - person_starts[person]  # the photo's place in its person's run
    drawn = np.flatnonzero(others > 0)
    draws = np.empty(len(drawn), np.int64)
    for k in range(0, len(drawn), _DRAW_CHUNK):  # a chunk of URIs as Python strings at a time, not all of them
        part = drawn[k : k + _DRAW_CHUNK]
        draws[k : k + len(part)] = [_draw(seed, u, m) for u, m in zip(distinct.take(pa.array(part)).to_pylist(),
                                                                        others[part].tolist())]  # fmt: skip
    reference = np.arange(len(first))  # a person's only photo: itself
    reference[drawn] = person_starts[person[drawn]] + draws + (draws >= own[drawn])  # skip the photo itself
    index = np.arange(len(uris))
    index[order.to_numpy()] = len(uris) + reference[photo_of_row]
    return pa.chunked_array([*_chunks(uris), *_chunks(distinct)], pa.string()).take(pa.array(index))


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return values.chunks if isinstance(values, pa.ChunkedArray) else [values]


def cross_photo_references(uris: Sequence[str], persons: Sequence[Any], seed: int) -> list[str]:
    """``cross_photo_reference_array`` of plain lists: for each row (photo ``uris[i]`` of person ``persons[i]``;
    None, NaN or empty: no person), the photo its training reference comes from."""
    if len(uris) != len(persons):
        raise ValueError(f"{len(uris)} photos but {len(persons)} persons")
    keys = pa.array([None if _no_person(p) else str(p) for p in persons], pa.string())
    return cross_photo_reference_array(pa.array([str(u) for u in uris], pa.string()), keys, seed).to_pylist()


class FacePairExtractor:
    """Turns face photos into a training pair: (augmented reference crop + landmarks + identity embedding, target
    image + landmarks).

    The reference is another photo of the same person when one is given (``reference``), else the target photo
    itself; either way under a random rotation/scale, so the landmark predictor must move the reference's shape
    into the target's pose and the mixer cannot copy pixels. The identity embedding is the reference's.
    """

    def __init__(self, config: FaceSnapTrainConfig, clip_size: int, face_embed_dim: int, num_landmarks: int = 68):
        self.config = config
        self.num_landmarks = num_landmarks
        self.clip_size = clip_size
        self.face_embed_dim = face_embed_dim
        self.landmarker = DlibLandmarks68(upsample=1)
        self.analyzer = None
        if config.faces is not None:
            from stylid_core.faces.factory import create_face_analyzer

            self.analyzer = create_face_analyzer(config.faces)

    def _face(self, image: np.ndarray, embed: bool = True) -> tuple[tuple[float, float, float, float], Any] | None:
        """The largest face's box and (with ``embed``) its embedding; None without a face."""
        if self.analyzer is not None:
            faces = self.analyzer.analyze(image, max_faces=1)
            if not faces or faces[0].embedding is None:
                return None
            return faces[0].box, np.asarray(faces[0].embedding, np.float32)
        boxes = self.landmarker.detect(image)
        if not boxes:
            return None
        return boxes[0], (self.landmarker.embed(image, boxes[0]) if embed else None)

    def __call__(self, image: np.ndarray, seed: int, reference: np.ndarray | None = None) -> dict[str, Any] | None:
        """The pair's arrays, or None when the target has no face. A ``reference`` without a face is ignored (the
        target photo is the reference then)."""
        found = self._face(image, embed=reference is None)
        if found is None:
            return None
        box, embedding = found
        lm = self.landmarker.landmarks(image, box)
        ref_image, ref_box = image, box
        if reference is not None:
            ref_found = self._face(reference)
            if ref_found is None:
                return self(image, seed)
            (ref_box, embedding), ref_image = ref_found, reference
        if embedding.size != self.face_embed_dim:
            raise ValueError(f"face embedding has {embedding.size} dims, the model expects {self.face_embed_dim}")
        ref_lm = lm if ref_image is image else self.landmarker.landmarks(ref_image, ref_box)
        h, w = image.shape[:2]
        rh, rw = ref_image.shape[:2]
        rng = np.random.default_rng(seed)
        angle = rng.uniform(-1, 1) * self.config.reference_rotation_deg
        scale = 1.0 + rng.uniform(-1, 1) * self.config.reference_scale_range
        center = ref_lm.mean(0)
        matrix = cv2.getRotationMatrix2D((float(center[0]), float(center[1])), angle, scale)
        ref_image = cv2.warpAffine(ref_image, matrix, (rw, rh), borderMode=cv2.BORDER_REFLECT)
        ref_lm = ref_lm @ matrix[:, :2].T + matrix[:, 2]
        pick = keypoints5_from_68 if self.num_landmarks == 5 else np.asarray
        return {
            "target": to_square(image, self.config.resolution),
            "target_landmarks": relative_landmarks(pick(lm), h, w),
            "reference_crop": align_face(ref_image, keypoints5_from_68(ref_lm), self.clip_size),
            "reference_landmarks": relative_landmarks(pick(ref_lm), rh, rw),
            "embedding": np.asarray(embedding, np.float32),
        }


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack pair dicts (numpy) into one batch dict."""
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = values if isinstance(values[0], str) else np.stack(values)
    return out


# ---- model -----------------------------------------------------------------------------------------------------
class FaceSnapTrainingModel(nn.Module):
    """The trainable modules plus (unregistered) frozen SD components; ``forward(batch)`` gives the losses.

    Only ``modules`` is registered, so DDP and optimisers see exactly the trainable parameters.
    """

    def __init__(self, components: SDComponents, modules: FaceSnapModules, config: FaceSnapTrainConfig) -> None:
        super().__init__()
        self.modules_ = modules
        self._components = [components]  # a list hides them from nn.Module registration
        self.config = config
        modules.identity.install(components.unet)

    @property
    def components(self) -> SDComponents:
        return self._components[0]

    def _tensor(self, x, dtype=torch.float32) -> torch.Tensor:
        device = next(self.modules_.parameters()).device
        return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device=device, dtype=dtype)

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        comps, cfg, mods = self.components, self.config, self.modules_
        mcfg = mods.config
        g = generator
        target = self._tensor(batch["target"]).permute(0, 3, 1, 2) / 127.5 - 1.0
        b = target.shape[0]
        device = target.device
        rand = lambda *s: torch.rand(*s, generator=g).to(device)  # noqa: E731
        with torch.no_grad():
            latents = (
                comps.vae.encode(target.to(comps.vae.dtype)).latent_dist.sample(g) * comps.vae.config.scaling_factor
            )
            captions = list(batch.get("caption", [cfg.default_caption] * b))
            drop = (torch.rand(b, generator=g) < cfg.caption_dropout).tolist()
            captions = ["" if d else c for c, d in zip(captions, drop)]
            tok = comps.tokenizer(captions, padding="max_length", max_length=comps.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")  # fmt: skip
            text = comps.text_encoder(tok.input_ids.to(device))[0]
            pixels = clip_pixels(list(np.asarray(batch["reference_crop"])), comps.image_encoder.config.image_size)
            patches = comps.image_encoder(pixels.to(device), output_hidden_states=True).hidden_states[-2]
        tokens = mods.mixer(patches, self._tensor(batch["embedding"]))
        keep = (rand(b) >= cfg.identity_dropout).to(tokens.dtype).view(b, 1, 1)
        tokens = tokens * keep

        ref_lm = self._tensor(batch["reference_landmarks"])
        tgt_lm = self._tensor(batch["target_landmarks"])
        if rand(1).item() < cfg.pose_angle_prob:
            angles = torch.from_numpy(np.stack([pose_angles_from_landmarks(x) for x in tgt_lm.cpu().numpy()]))
            pred, _ = mods.predictor(ref_lm, pose_angles=angles.to(device))
        else:
            radius = (tgt_lm - tgt_lm.mean(1, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt().view(b, 1, 1)
            noise = torch.randn(tgt_lm.shape, generator=g).to(device) * cfg.driver_shape_jitter * radius
            pred, _ = mods.predictor(ref_lm, driving_landmarks=tgt_lm + noise)
        lm_loss = landmark_loss(pred, tgt_lm)

        lat_h, lat_w = latents.shape[-2:]
        up = mcfg.landmark_map_upscale
        lmap = render_landmark_map(tgt_lm, lat_h * up, lat_w * up, mcfg.landmark_channels, mcfg.landmark_sigma)
        noise = torch.randn(latents.shape, generator=g).to(device)
        steps = comps.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=g).to(device)
        noisy = comps.noise_scheduler.add_noise(latents, noise, t)
        if comps.noise_scheduler.config.prediction_type == "v_prediction":
            goal = comps.noise_scheduler.get_velocity(latents, noise, t)
        else:
            goal = noise
        pred_eps = mods.identity.predict_noise(comps.unet, noisy, t, text, tokens, lmap, 1.0, 1.0)
        diff_loss = F.mse_loss(pred_eps.float(), goal.float())
        loss = diff_loss + cfg.landmark_loss_weight * lm_loss
        return {"loss": loss, "diffusion_loss": diff_loss.detach(), "landmark_loss": lm_loss.detach()}


class FaceSnapTrainer:
    """Owns the training model, optimiser and step counter; saves/resumes checkpoints (any fsspec URI)."""

    def __init__(self, config: FaceSnapTrainConfig, device: torch.device | str = "cpu",
                 components: SDComponents | None = None) -> None:  # fmt: skip
        self.config = config
        self.device = torch.device(device)
        torch.manual_seed(config.seed)
        if components is None:
            if config.tiny is not None:
                components = tiny_components(config.tiny)
            else:
                components = load_components(config.base_model, config.image_encoder)
        self.components = components.to(self.device)
        torch.manual_seed(config.seed)
        model_cfg = config.model or (
            tiny_model_config(components) if config.tiny is not None else FaceSnapModelConfig()
        )
        self.modules = FaceSnapModules(model_cfg, components.unet).to(self.device)
        self.model = FaceSnapTrainingModel(self.components, self.modules, config)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.modules.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.step = 0
        self.resumed_from: int | None = None

    def train_step(self, batch: dict[str, Any], model: nn.Module | None = None) -> dict[str, float]:
        """One optimiser step on ``batch``; ``model`` may be a DDP wrapper of ``self.model``."""
        model = model or self.model
        self.modules.train()
        amp = self.config.mixed_precision != "no" and self.device.type == "cuda"
        dtype = torch.bfloat16 if self.config.mixed_precision == "bf16" else torch.float16
        # noise, timesteps and dropouts come from (seed, step), so a resumed run repeats an uninterrupted one
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)
        with torch.autocast(self.device.type, dtype=dtype, enabled=amp):
            losses = model(batch, generator=g)
        self.optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.modules.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def evaluate(self, batch: dict[str, Any], seed: int = 1234) -> dict[str, float]:
        """Losses on ``batch`` with fixed noise, timesteps and dropouts (comparable across steps)."""
        self.modules.eval()
        g = torch.Generator().manual_seed(seed)
        return {k: float(v) for k, v in self.model(batch, generator=g).items()}

    def save(self, path: str, storage_options: dict | None = None) -> None:
        """The modules (``save_facesnap`` layout) plus ``train_state.pt`` (optimiser, step) under ``path``."""
        save_facesnap(self.modules, path, storage_options)
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        state = {"optimizer": self.optimizer.state_dict(), "step": self.step, "config": self.config.to_dict()}
        with fs.open(f"{root}/{TRAIN_STATE_NAME}", "wb") as f:
            torch.save(state, f)
        with fs.open(f"{root}/train_progress.json", "w") as f:
            json.dump({"step": self.step, "resumed_from": self.resumed_from}, f)

    def load(self, path: str, storage_options: dict | None = None) -> None:
        """Resume from a folder written by ``save``."""
        _, weights = read_facesnap(path, storage_options)
        self.modules.load_state_dict(weights, strict=True)
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        with fs.open(f"{root}/{TRAIN_STATE_NAME}", "rb") as f:
            state = torch.load(f, map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.resumed_from = self.step
