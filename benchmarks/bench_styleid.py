"""Per-image time and peak memory of the diffusion engine against two baselines, measured in one run.

- **ours**: ``DiffusionStylizer`` - contents batched ``--batch`` per UNet call, the style inverted once and its
  self-attention keys/values kept in memory on the device for every content image;
- **(a) img2img**: diffusers' ``StableDiffusionImg2ImgPipeline`` on the same components (stock attention), strength
  1.0 (so it runs all ``--steps`` steps), empty prompt, no classifier-free guidance, same batch;
- **(b) StyleID official flow**: one image at a time, DDIM inversion of the style *and* the content every time, the
  recorded features written to disk with ``torch.save`` (pickle) and read back before sampling, as StyleID's
  ``run_styleid.py`` does with its feature pickles.

Targets on a GPU with SD 1.5 at 512 px: ours <= 1.5x (a), >= 10x faster than (b). On a CPU the figures only show
the shape of the costs (tiny model, small images); the table says which device ran.

    python benchmarks/bench_styleid.py                          # tiny model on CPU
    python benchmarks/bench_styleid.py --model runwayml/stable-diffusion-v1-5 --device cuda --size 512 \\
        --steps 50 --batch 8 --n-content 16
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil
import torch

from stylid_core.stylize.diffusion.engine import ContentPass, DiffusionStylizer, StyleFeatures
from stylid_core.stylize.diffusion.tiny import build_tiny_components


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak on a GPU, else the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._proc.memory_info().rss) - self._base


def _images(n: int, size: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        base = np.stack([xx, yy, 1 - xx * yy], axis=2) * rng.uniform(80, 255, 3)
        out.append(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))
    return out


def measure(name: str, device: torch.device, n_images: int, fn: Callable[[], object]) -> dict:
    gc.collect()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"name": name, "s_per_image": seconds / n_images, "peak_mib": mem.peak_bytes / 2**20}


def official_flow(engine: DiffusionStylizer, contents, style, workdir: str) -> list[np.ndarray]:
    """StyleID's published flow, one image at a time: invert both, pickle the features to disk, reload, sample."""
    outputs = []
    for i, content in enumerate(contents):
        size = engine.working_size(*content.shape[:2])
        style_latent = engine.encode(engine._to_tensor([style], engine.working_size(*style.shape[:2])))
        style_traj, style_rec = engine._invert_recording(style_latent, ("k", "v"))
        torch.save(
            {"k": style_rec["k"], "v": style_rec["v"], "z_T": style_traj[engine.schedule.timesteps[0]]},
            os.path.join(workdir, f"style_{i}.pt"),
        )
        content_latent = engine.encode(engine._to_tensor([content], size))
        content_traj, content_rec = engine._invert_recording(content_latent, ("q",))
        torch.save({"q": content_rec["q"], "trajectory": content_traj}, os.path.join(workdir, f"content_{i}.pt"))
        del style_rec, content_rec, style_traj, content_traj
        s = torch.load(os.path.join(workdir, f"style_{i}.pt"), map_location=engine.device)
        c = torch.load(os.path.join(workdir, f"content_{i}.pt"), map_location=engine.device)
        features = StyleFeatures("official", s["k"], s["v"], s["z_T"])
        content_pass = ContentPass(c["q"], None, None, c["trajectory"])
        z_T = engine.adain(c["trajectory"][engine.schedule.timesteps[0]], s["z_T"])
        latents = engine.sample(z_T, features, content_pass, None)
        image = engine.decode(latents)[0]
        outputs.append(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    return outputs


def img2img_pipeline(args, engine: DiffusionStylizer):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    if args.model == "tiny":
        parts = build_tiny_components()  # fresh components: stock attention processors
        pipe = StableDiffusionImg2ImgPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=parts.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(
            args.model, torch_dtype=engine.dtype, safety_checker=None, requires_safety_checker=False
        )
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(engine.device, engine.dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (in-process random model) or an SD folder/hub id")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=64, help="working resolution (px, square images)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-content", type=int, default=8)
    parser.add_argument("--inversion-stride", type=int, default=1, help="ours only: invert every k-th timestep")
    parser.add_argument("--workdir", default=None, help="where the official flow writes its feature files")
    args = parser.parse_args()

    options = dict(device=args.device, resolution=args.size, steps=args.steps, batch_size=args.batch)
    options.update(tiny=True) if args.model == "tiny" else options.update(model=args.model)
    engine = DiffusionStylizer(**options, inversion_stride=args.inversion_stride)
    # the official flow: full inversion, one image at a time (an engine of its own when ours strides)
    official_engine = engine if args.inversion_stride == 1 else DiffusionStylizer(**{**options, "batch_size": 1})
    device = engine.device
    contents = _images(args.n_content, args.size, seed=1)
    style = _images(1, args.size, seed=2)[0]
    pipe = img2img_pipeline(args, engine)
    pil = [__import__("PIL.Image").Image.fromarray(c) for c in contents]

    def ours() -> None:
        engine.style_cache.clear()  # the style is inverted once per run, inside the timing
        engine.stylize_batch(contents, [style] * len(contents))

    def img2img() -> None:
        for start in range(0, len(pil), args.batch):
            chunk = pil[start : start + args.batch]
            pipe(
                prompt=[""] * len(chunk),
                image=chunk,
                strength=1.0,
                num_inference_steps=args.steps,
                guidance_scale=1.0,
                output_type="np",
            )

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:

        def official() -> None:
            official_flow(official_engine, contents, style, workdir)

        # warm-up (kernels, allocator, lazy imports), then the timed runs
        engine.stylize_batch(contents[:1], [style]), official_flow(official_engine, contents[:1], style, workdir)
        pipe(prompt=[""], image=pil[:1], strength=1.0, num_inference_steps=2, guidance_scale=1.0, output_type="np")
        rows = [
            measure("ours (batched, in-memory style cache)", device, len(contents), ours),
            measure("(a) diffusers img2img, same steps/batch", device, len(contents), img2img),
            measure("(b) StyleID official flow (disk features)", device, len(contents), official),
        ]

    on_gpu = device.type == "cuda"
    print()
    if not on_gpu:
        print("*** RAN ON CPU - no GPU in this session: figures show the shape of the costs only; the GPU targets")
        print("*** (ours <= 1.5x img2img, >= 10x faster than the official flow) apply to SD 1.5 on a GPU.")
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {name} | model: {engine.model} | dtype: {str(engine.dtype).removeprefix('torch.')} | "
        f"size {args.size} | steps {args.steps} | batch {args.batch} | contents {args.n_content} | "
        f"injected layers {len(engine.layers)} | ours: inversion_stride {args.inversion_stride}"
    )
    mem_kind = "peak GPU MiB" if on_gpu else "peak RSS MiB"
    print(f"{'method':<45} {'s/image':>10} {mem_kind:>14}")
    for row in rows:
        print(f"{row['name']:<45} {row['s_per_image']:>10.3f} {row['peak_mib']:>14.1f}")
    ours_t, img_t, off_t = (r["s_per_image"] for r in rows)
    print(f"ours / img2img time  = {ours_t / img_t:.2f}x   (target on GPU: <= 1.5x)")
    print(f"official / ours time = {off_t / ours_t:.2f}x   (target on GPU: >= 10x)")
    print(f"style features cached in memory: {next(iter(engine.style_cache._items.values())).nbytes / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
