"""Nights of ``stylid score`` with the scoring itself replaced by hand-built shards (no Ray, no models): what the
tests of the baseline rule, the drift gate, face pairing and the exit codes drive through the real CLI entry.

``install_fake_scoring(monkeypatch)`` replaces ``run_score``: the manifest argument ``offset:<x>:<seed>[:<mode>]``
gives the night's id_sim offset, its noise seed and optionally how its face list differs from the canary's
(``lost``: one face of ``img000`` not found; ``reordered``: each image's faces listed, and indexed, in reverse;
``lost+reordered``: both)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

N_IMAGES, FACES_PER_IMAGE = 15, 2  # 30 faces of 40 px: the 32-48 bucket is gated with the default min_faces 20
FIXED = np.random.default_rng(0).normal(0, 0.02, N_IMAGES * FACES_PER_IMAGE)  # each face's own level, every night


def shards(id_sim_offset: float, night_seed: int, mode: str = "") -> tuple[pa.Table, pa.Table]:
    """The night's (faces, metrics) tables."""
    rng = np.random.default_rng(night_seed)
    metrics, faces = [], []
    for i in range(N_IMAGES):
        image_id = f"img{i:03d}"
        metrics.append({"image_id": image_id, "status": "ok", "error": None, "style_distance": 1.5,
                        "colour_distance": 3.0, "content_ssim": 0.7 + rng.normal(0, 0.002)})  # fmt: skip
        rows = []
        for k in range(FACES_PER_IMAGE):
            x0 = 10.0 + 100 * k
            rows.append({"image_id": image_id, "face_index": k, "x0": x0, "y0": 10.0, "x1": x0 + 40, "y1": 50.0,
                         "size_px": 40.0, "size_bucket": "32-48", "id_match": True, "redetected": True,
                         "id_sim": 0.9 + FIXED[i * FACES_PER_IMAGE + k] + id_sim_offset + rng.normal(0, 0.002),
                         "backend": "dlib"})  # fmt: skip
        if "lost" in mode and i == 0:
            rows = rows[1:]
        if "reordered" in mode:
            rows = [{**r, "face_index": k} for k, r in enumerate(reversed(rows))]
        faces.extend(rows)
    return pa.Table.from_pandas(pd.DataFrame(faces)), pa.Table.from_pandas(pd.DataFrame(metrics))


def install_fake_scoring(monkeypatch) -> None:
    import jobs.score
    import pipelines.score
    from pipelines.runner import RunResult
    from stylid_core import ledger

    def run_score(config, manifest_uri, output_uri):
        _, offset, seed, *mode = manifest_uri.split(":")
        faces, metrics = shards(float(offset), int(seed), mode[0] if mode else "")
        ledger.write_shard_pair(output_uri, faces, metrics, config.io.storage_options)
        return RunResult(total_rows=N_IMAGES, already_done=0, processed=N_IMAGES, seconds=1.0)

    monkeypatch.setattr(pipelines.score, "run_score", run_score)
    monkeypatch.setattr(pipelines.score, "iter_score_manifest", lambda *a, **k: iter(()))
    monkeypatch.setattr(jobs.score, "preflight_score", lambda *a, **k: None)  # the manifest is no file here
    monkeypatch.setattr(jobs.score, "init_ray", lambda *a, **k: None)
