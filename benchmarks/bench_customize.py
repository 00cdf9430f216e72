"""Cost of the FaceSnap customize engine against plain diffusers text-to-image at the same steps and batch.

Reports images/s and peak memory of both, and their ratio (target: FaceSnap <= 1.3x plain SD's time per image).
On a GPU (``--device cuda``) peak memory is CUDA's peak allocation; on CPU it is the process's peak RSS growth
measured in a fresh child process per engine (so the two do not share a high-water mark), split into set-up
(extra modules; for FaceSnap also the dlib models used to find the reference's landmarks) and inference growth.

Without a GPU it runs *small*: random components at ``--size`` px with ``--width`` UNet channels. Those figures
show the relative overhead of the identity attention, the mixer and the ControlNet branch, not SD 1.5 speed.

    python benchmarks/bench_customize.py --device cpu --size 64 --steps 4 --batch 2
    python benchmarks/bench_customize.py --device cuda --sd15-shapes --size 512 --steps 30 --batch 4 --dtype float16

``--synthetic-face`` draws the reference's 68 landmarks geometrically (``template_landmarks68``) and gives it a
random unit embedding instead of running dlib (whose model files are not on the GPU machine); the timed work is
the same. ``--json PATH`` also writes the report there.

Each engine's time per batch is split into the denoising loop (time inside the UNet and, for FaceSnap, the landmark
ControlNet; reported per step) and the fixed per-batch rest (text encoder, CLIP image encoder + mixer + landmark
predictor once per reference, VAE decode), and the ratio is extrapolated to ``--extrapolate-steps`` steps from
those: at few steps the fixed costs dominate.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # also in the spawned children
os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: the face's box in ``skimage.data.astronaut()`` (x0, y0, x1, y1), for ``--synthetic-face``
SYNTHETIC_FACE_BOX = (176.0, 62.0, 274.0, 183.0)


def _components(args):
    from stylid_core.customize.facesnap.components import random_sd15_components, tiny_components
    from stylid_core.customize.facesnap.config import TinyComponentsConfig

    if args.sd15_shapes:  # SD 1.5's UNet, VAE, text encoder and a CLIP ViT-H/14 (random weights): GPU timings
        return random_sd15_components(args.size, "vit-h-14")
    tiny = TinyComponentsConfig(sample_size=args.size, block_out_channels=(args.width, args.width * 2),
                                cross_attention_dim=32)  # fmt: skip
    return tiny_components(tiny)


class _Timer:
    """Wall time spent inside the forward calls of some modules (hooks; CUDA synchronised at both ends)."""

    def __init__(self, modules, cuda: bool) -> None:
        self.total, self.calls, self._t0, self.cuda = 0.0, 0, None, cuda
        for m in modules:
            m.register_forward_pre_hook(self._start)
            m.register_forward_hook(self._stop)

    def _now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def _start(self, *_) -> None:
        self._t0 = self._now()

    def _stop(self, *_) -> None:
        self.total += self._now() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.total, self.calls = 0.0, 0


def _run(kind: str, args, queue) -> None:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from stylid_core.customize.facesnap.engine import FaceSnapEngine, tiny_model_config
    from stylid_core.customize.facesnap.modules import FaceSnapModules

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    comps = _components(args)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # after the shared SD components are built
    if kind == "plain":
        pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                       unet=comps.unet, scheduler=comps.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)  # fmt: skip
        pipe = pipe.to(device, dtype)
        pipe.set_progress_bar_config(disable=True)
        unet_t, branch_t = _Timer([comps.unet], device.type == "cuda"), None

        def once(seed):
            pipe("a portrait", num_inference_steps=args.steps, guidance_scale=5.0, height=args.size,
                 width=args.size, num_images_per_prompt=args.batch, output_type="np",
                 generator=torch.Generator().manual_seed(seed))  # fmt: skip
    else:
        extra = {"num_tokens": 16, "mixer_dim": 768, "mixer_depth": 4, "mixer_heads": 12} if args.sd15_shapes else {}
        modules = FaceSnapModules(tiny_model_config(comps, **extra), comps.unet)
        engine = FaceSnapEngine(comps, modules).to(device, dtype)
        unet_t = _Timer([comps.unet], device.type == "cuda")
        branch_t = _Timer([modules.identity.controlnet], device.type == "cuda")
        from skimage.data import astronaut

        from stylid_core.customize.facesnap.landmarks import keypoints5_from_68, template_landmarks68
        from stylid_core.faces.base import Face

        img = astronaut()
        if args.synthetic_face:  # no dlib: drawn landmarks around the astronaut's face, a random unit embedding
            box = SYNTHETIC_FACE_BOX
            points = template_landmarks68(box)
            embedding = np.random.default_rng(0).normal(size=modules.config.face_embed_dim).astype(np.float32)
            embedding /= np.linalg.norm(embedding)
        else:
            from stylid_core.customize.facesnap.faceprep import shared_landmarker

            lm = shared_landmarker()
            box = lm.detect(img)[0]
            points = lm.landmarks(img, box)
            embedding = lm.embed(img, box)
        face = Face(box=box, keypoints=keypoints5_from_68(points), score=1.0, embedding=embedding,
                    landmarks=points)  # fmt: skip

        def once(seed):
            engine.generate(img, face, "a portrait", num_images=args.batch, seed=seed, resolution=args.size,
                            num_inference_steps=args.steps, guidance_scale=5.0, max_batch=args.batch,
                            landmark_steps_end=args.landmark_steps_end)  # fmt: skip

    setup_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    once(0)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    unet_t.reset()
    if branch_t is not None:
        branch_t.reset()
    for r in range(args.repeats):
        t0 = time.perf_counter()
        once(r + 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        # peak RSS growth past set-up (KiB -> MiB on Linux); 0 when inference stays under set-up's high-water mark
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024 - setup_mib
    sec = float(np.median(times))
    n = args.repeats
    unet_sec = unet_t.total / n
    branch_sec = branch_t.total / n if branch_t is not None else 0.0
    branch_calls = branch_t.calls // n if branch_t is not None else 0
    step_sec = (unet_sec + branch_sec) / args.steps
    fixed_sec = float(np.mean(times)) - unet_sec - branch_sec
    used = comps.unet.dtype  # the dtype the UNet actually ran in
    queue.put({"kind": kind, "dtype": str(used).removeprefix("torch."),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "sec_per_batch": sec,
               "images_per_s": args.batch / sec, "peak_mem_mib": peak,
               "setup_mem_mib": setup_mib, "sec_per_step": step_sec, "fixed_sec_per_batch": fixed_sec,
               "fixed_share": fixed_sec / float(np.mean(times)), "unet_calls_per_batch": unet_t.calls // n,
               "branch_calls_per_batch": branch_calls,
               "branch_sec_per_call": branch_sec / branch_calls if branch_calls else None,
               "unet_sec_per_call": unet_sec / (unet_t.calls // n)})  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    from stylid_core.customize.facesnap.config import FaceSnapConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64, help="image px")
    p.add_argument("--width", type=int, default=32, help="UNet base channels of the small CPU model")
    p.add_argument("--sd15-shapes", action="store_true", help="SD 1.5-sized random components (GPU)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--landmark-steps-end",
        type=float,
        default=FaceSnapConfig.landmark_steps_end,
        help="fraction of the steps that run FaceSnap's landmark branch (default: the config's)",
    )
    p.add_argument("--extrapolate-steps", type=int, default=50, help="steps to extrapolate the ratio to")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"), help="weights' dtype")
    p.add_argument("--synthetic-face", action="store_true", help="drawn landmarks, random embedding: no dlib")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = {}
    for kind in ("plain", "facesnap"):
        q = ctx.Queue()
        proc = ctx.Process(target=_run, args=(kind, args, q))
        proc.start()
        results[kind] = q.get()
        proc.join()
    ratio = results["facesnap"]["sec_per_batch"] / results["plain"]["sec_per_batch"]
    # the same split at N steps; the branch runs on the first landmark_steps_end of them
    from stylid_core.customize.facesnap.engine import landmark_branch_steps

    fs, pl, big = results["facesnap"], results["plain"], args.extrapolate_steps
    unet_f = fs["unet_sec_per_call"] * big
    branch_f = (fs["branch_sec_per_call"] or 0.0) * landmark_branch_steps(big, args.landmark_steps_end)
    extrapolated = (fs["fixed_sec_per_batch"] + unet_f + branch_f) / (
        pl["fixed_sec_per_batch"] + pl["unet_sec_per_call"] * big
    )
    report = {
        "device": args.device,
        "device_name": results["plain"]["device_name"],
        "torch": results["plain"]["torch"],
        "dtype": results["plain"]["dtype"],
        "synthetic_face": args.synthetic_face,
        "repeats": args.repeats,
        "note": ("small random CPU model: relative overhead only, not SD 1.5 throughput"
                 if args.device == "cpu" and not args.sd15_shapes else "as configured"),  # fmt: skip
        "size": args.size, "steps": args.steps, "batch": args.batch, "sd15_shapes": args.sd15_shapes,
        "plain": results["plain"], "facesnap": results["facesnap"],
        "landmark_steps_end": args.landmark_steps_end,
        "time_ratio": ratio, "target_ratio": 1.3, "within_target": ratio <= 1.3,
        f"time_ratio_at_{big}_steps_extrapolated": extrapolated,
        "denoise_step_ratio": fs["sec_per_step"] / pl["sec_per_step"],
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
