"""FaceSnap training at true size: step time and peak memory of ``FaceSnapTrainer.train_step`` on Stable Diffusion
1.5-shaped components with random weights (built from the published configs written out in
``random_sd15_components``: nothing is downloaded) and the FaceSnap modules at their SD 1.5 sizes.

One step is what the training job runs: VAE-encode the target, encode the caption and the reference crop (CLIP
vision patch tokens), mix the identity tokens, predict target landmarks, run the landmark ControlNet and the UNet
with identity attention, then backward and AdamW on the trainable modules only (SD stays frozen). The first step
(which also allocates the optimiser state) is a warm-up and is not timed.

Memory: peak RSS of the process (CPU), and CUDA's peak allocation on a GPU. On CPU the run refuses to start when
its estimate (4 bytes per frozen parameter, 16 per trainable one: weights, gradients and AdamW's two moments, plus
``--headroom-gb``) is over ``--max-mem-gb``.

    python benchmarks/bench_train_customizer.py --device cpu --size 256 --batch 1 --steps 2 --image-encoder vit-l-14
    python benchmarks/bench_train_customizer.py --device cuda --size 512 --batch 8 --steps 10 --mixed-precision fp16

``--synthetic-face`` builds the pairs from drawn landmarks (``template_landmarks68``) instead of dlib's predictor
(whose model files are not on the GPU machine); the step is the same. ``--json PATH`` also writes the report there.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _params(module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def _build(args):
    """The frozen components: SD 1.5-shaped (default) or tiny (``--tiny``), random weights either way."""
    from stylid_core.customize.facesnap.components import random_sd15_components, tiny_components
    from stylid_core.customize.facesnap.config import TinyComponentsConfig

    if args.tiny:
        return tiny_components(TinyComponentsConfig(sample_size=args.size))
    return random_sd15_components(args.size, args.image_encoder)


def _model_config(components, args):
    from stylid_core.customize.facesnap.config import FaceSnapModelConfig

    if args.tiny:
        from stylid_core.customize.facesnap.engine import tiny_model_config

        return tiny_model_config(components, face_embed_dim=512)

    # the SD 1.5 defaults of FaceSnapModelConfig, sized to the vision tower; 512-d ArcFace embeddings
    return FaceSnapModelConfig(clip_dim=components.image_encoder.config.hidden_size, face_embed_dim=512,
                               cross_attention_dim=components.unet.config.cross_attention_dim)  # fmt: skip


def _synthetic_pair(config, clip_size: int) -> dict:
    """A training pair from the astronaut photo with drawn 68-point landmarks (no dlib), reference = target."""
    from skimage.data import astronaut

    from benchmarks.bench_customize import SYNTHETIC_FACE_BOX
    from stylid_core.customize.facesnap.faceprep import align_face, relative_landmarks, to_square
    from stylid_core.customize.facesnap.landmarks import keypoints5_from_68, template_landmarks68

    image = astronaut()
    points = template_landmarks68(SYNTHETIC_FACE_BOX)
    rel = relative_landmarks(points, *image.shape[:2])
    crop = align_face(image, keypoints5_from_68(points), clip_size)
    return {"target": to_square(image, config.resolution), "target_landmarks": rel, "reference_crop": crop,
            "reference_landmarks": rel}  # fmt: skip


def _batch(config, batch: int, clip_size: int, embed_dim: int, synthetic: bool = False):
    """``batch`` training pairs from the astronaut photo (real dlib landmarks, reference crops under different
    augmentations; or drawn landmarks with ``synthetic``), each with a random unit ``embed_dim`` identity
    embedding (ArcFace-sized)."""
    import numpy as np
    from skimage.data import astronaut

    from stylid_core.customize.facesnap.training import FacePairExtractor, collate

    extractor = None if synthetic else FacePairExtractor(config, clip_size=clip_size, face_embed_dim=128)
    rng = np.random.default_rng(0)
    pairs = []
    for seed in range(batch):
        pair = _synthetic_pair(config, clip_size) if synthetic else extractor(astronaut(), seed=seed)
        emb = rng.normal(size=embed_dim).astype(np.float32)
        pairs.append({**pair, "embedding": emb / np.linalg.norm(emb), "caption": "a photo of a person"})
    return collate(pairs)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--size", type=int, default=256, help="training image px (SD 1.5 trains at 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    p.add_argument("--image-encoder", default="vit-h-14", help="CLIP vision tower: vit-h-14 (IP-Adapter's), vit-l-14")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"), help="autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    p.add_argument("--max-mem-gb", type=float, default=16.0, help="CPU: refuse to start above this estimate")
    p.add_argument("--headroom-gb", type=float, default=2.5, help="CPU: activations and runtime in the estimate")
    p.add_argument("--tiny", action="store_true", help="tiny random components instead of SD 1.5's (smoke runs)")
    p.add_argument("--synthetic-face", action="store_true", help="drawn landmarks instead of dlib's predictor")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)

    import torch

    from stylid_core.customize.facesnap.modules import FaceSnapModules
    from stylid_core.customize.facesnap.training import FaceSnapTrainConfig, FaceSnapTrainer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    with torch.device("meta"):  # sizes first, without allocating
        meta = _build(args)
        model_cfg = _model_config(meta, args)
        meta_modules = FaceSnapModules(model_cfg, meta.unet)
    frozen = sum(_params(m) for m in (meta.unet, meta.vae, meta.text_encoder, meta.image_encoder))
    trainable = _params(meta_modules, trainable=True)
    estimate_gb = (4 * frozen + 16 * trainable) / 2**30 + args.headroom_gb
    if device.type == "cpu" and estimate_gb > args.max_mem_gb:
        raise SystemExit(f"estimated {estimate_gb:.1f} GiB > --max-mem-gb {args.max_mem_gb}: use a smaller setup")
    del meta, meta_modules

    t0 = time.perf_counter()
    components = _build(args)
    config = FaceSnapTrainConfig(
        manifest="(benchmark: in-memory batch)", storage_path="(unused)",
        base_model=f"(random {'tiny' if args.tiny else 'SD 1.5'} shapes)",
        image_encoder=args.image_encoder, model=model_cfg.to_dict(), resolution=args.size, batch_size=args.batch,
        mixed_precision=args.mixed_precision, use_gpu=device.type == "cuda",
    )  # fmt: skip
    trainer = FaceSnapTrainer(config, device=device, components=components)
    build_s = time.perf_counter() - t0
    batch = _batch(config, args.batch, components.image_encoder.config.image_size, model_cfg.face_embed_dim,
                   synthetic=args.synthetic_face)  # fmt: skip
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB

    def step() -> tuple[float, dict]:
        t = time.perf_counter()
        losses = trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t, losses

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s, _ = step()
    times, losses = [], {}
    for _ in range(args.steps):
        sec, losses = step()
        times.append(sec)
    report = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "model": "tiny (random)" if args.tiny else "sd15-shaped (random)",
        "dtype": str(components.unet.dtype).removeprefix("torch."),
        "autocast": {"no": None, "fp16": "float16", "bf16": "bfloat16"}[args.mixed_precision]
        if device.type == "cuda"
        else None,
        "synthetic_face": args.synthetic_face,
        "torch_threads": torch.get_num_threads(),
        "size_px": args.size,
        "batch": args.batch,
        "image_encoder": "tiny" if args.tiny else args.image_encoder,
        "mixed_precision": args.mixed_precision,
        "params_frozen_M": round(frozen / 1e6, 1),
        "params_trainable_M": round(trainable / 1e6, 1),
        "build_s": round(build_s, 1),
        "warmup_step_s": round(warmup_s, 2),
        "step_s": [round(t, 2) for t in times],
        "step_s_median": round(statistics.median(times), 2),
        "peak_rss_gib_after_build": round(rss_built, 2),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "cuda_peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "last_losses": {k: round(v, 4) for k, v in losses.items()},
    }
    print(
        f"FaceSnap training step, {report['model']} weights ({report['params_frozen_M']}M frozen,"
        f" {report['params_trainable_M']}M trainable, {report['image_encoder']}), {args.size} px, batch {args.batch},"
        f" {report['device']} ({report['torch_threads']} threads), mixed precision {args.mixed_precision}:\n"
        f"  step time {report['step_s_median']} s (median of {args.steps}: {report['step_s']}; warm-up"
        f" {report['warmup_step_s']} s)\n"
        f"  peak RSS {report['peak_rss_gib']} GiB (after building the models:"
        f" {report['peak_rss_gib_after_build']} GiB)"
        + (f"; CUDA peak {report['cuda_peak_gib']} GiB" if report["cuda_peak_gib"] is not None else "")
    )
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
