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


def _model_config(components, args):
    from stylid_core.customize.facesnap.config import FaceSnapModelConfig

    # the SD 1.5 defaults of FaceSnapModelConfig, sized to the vision tower; 512-d ArcFace embeddings
    return FaceSnapModelConfig(clip_dim=components.image_encoder.config.hidden_size, face_embed_dim=512,
                               cross_attention_dim=components.unet.config.cross_attention_dim)  # fmt: skip


def _batch(config, batch: int, clip_size: int, embed_dim: int):
    """``batch`` training pairs from the astronaut photo (real dlib landmarks, reference crops under different
    augmentations), each with a random unit ``embed_dim`` identity embedding (ArcFace-sized)."""
    import numpy as np
    from skimage.data import astronaut

    from stylid_core.customize.facesnap.training import FacePairExtractor, collate

    extractor = FacePairExtractor(config, clip_size=clip_size, face_embed_dim=128)
    rng = np.random.default_rng(0)
    pairs = []
    for seed in range(batch):
        pair = extractor(astronaut(), seed=seed)
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
    args = p.parse_args(argv)

    import torch

    from stylid_core.customize.facesnap.components import random_sd15_components
    from stylid_core.customize.facesnap.modules import FaceSnapModules
    from stylid_core.customize.facesnap.training import FaceSnapTrainConfig, FaceSnapTrainer

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    with torch.device("meta"):  # sizes first, without allocating
        meta = random_sd15_components(args.size, args.image_encoder)
        model_cfg = _model_config(meta, args)
        meta_modules = FaceSnapModules(model_cfg, meta.unet)
    frozen = sum(_params(m) for m in (meta.unet, meta.vae, meta.text_encoder, meta.image_encoder))
    trainable = _params(meta_modules, trainable=True)
    estimate_gb = (4 * frozen + 16 * trainable) / 2**30 + args.headroom_gb
    if device.type == "cpu" and estimate_gb > args.max_mem_gb:
        raise SystemExit(f"estimated {estimate_gb:.1f} GiB > --max-mem-gb {args.max_mem_gb}: use a smaller setup")
    del meta, meta_modules

    t0 = time.perf_counter()
    components = random_sd15_components(args.size, args.image_encoder)
    config = FaceSnapTrainConfig(
        manifest="(benchmark: in-memory batch)", storage_path="(unused)", base_model="(random SD 1.5 shapes)",
        image_encoder=args.image_encoder, model=model_cfg.to_dict(), resolution=args.size, batch_size=args.batch,
        mixed_precision=args.mixed_precision, use_gpu=device.type == "cuda",
    )  # fmt: skip
    trainer = FaceSnapTrainer(config, device=device, components=components)
    build_s = time.perf_counter() - t0
    batch = _batch(config, args.batch, components.image_encoder.config.image_size, model_cfg.face_embed_dim)
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
        "torch_threads": torch.get_num_threads(),
        "size_px": args.size,
        "batch": args.batch,
        "image_encoder": args.image_encoder,
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
        f"FaceSnap training step, SD 1.5-shaped random weights ({report['params_frozen_M']}M frozen,"
        f" {report['params_trainable_M']}M trainable, {args.image_encoder}), {args.size} px, batch {args.batch},"
        f" {report['device']} ({report['torch_threads']} threads), mixed precision {args.mixed_precision}:\n"
        f"  step time {report['step_s_median']} s (median of {args.steps}: {report['step_s']}; warm-up"
        f" {report['warmup_step_s']} s)\n"
        f"  peak RSS {report['peak_rss_gib']} GiB (after building the models:"
        f" {report['peak_rss_gib_after_build']} GiB)"
        + (f"; CUDA peak {report['cuda_peak_gib']} GiB" if report["cuda_peak_gib"] is not None else "")
    )
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
