"""Per-image time and peak memory of the diffusion engine against two baselines, measured in one run.

- **ours**: ``DiffusionStylizer`` - contents batched ``--batch`` per UNet call, the style inverted once and its
  self-attention keys/values kept in memory on the device for every content image; one row per
  ``inversion_stride`` in ``--strides`` (the content and style inversions use every k-th timestep);
- **(a) img2img, strict**: diffusers' ``StableDiffusionImg2ImgPipeline`` on the same components (stock attention),
  strength 1.0 (all ``--steps`` steps), empty prompt, no classifier-free guidance, same batch. Ours inverts the
  content (``steps / stride`` UNet passes) and then samples (``steps`` passes), so against this row ours costs
  about ``1 + 1 / stride`` times by construction;
- **(a') img2img, diffusers' defaults**: the same pipeline as diffusers runs it by default, strength 0.8 (80% of
  the steps) and guidance scale 7.5, whose classifier-free guidance doubles the UNet batch;
- **(b) StyleID official flow**: one image at a time, DDIM inversion of the style *and* the content every time, the
  recorded features written to disk with ``torch.save`` (pickle) and read back before sampling, as StyleID's
  ``run_styleid.py`` does with its feature pickles.

Every method runs on the same UNet/VAE/text encoder (one copy in memory; the attention processors are swapped in
before each method). The images carry no faces, so the content consistency guidance is idle. The ``UNet
passes/image`` column counts the UNet evaluations each method made per image (a batch of B counts B).

Targets on a GPU with SD 1.5 at 512 px: ours <= 1.5x (a), >= 10x faster than (b). ``--sd-shaped`` builds an
SD-1.5-shaped model with random weights in-process (true per-call cost, nothing downloaded). On a CPU the figures
only show the shape of the costs; the table says which device ran.

    python benchmarks/bench_styleid.py                                   # tiny model on CPU
    python benchmarks/bench_styleid.py --sd-shaped --size 256 --steps 10 --batch 2 --n-content 2   # CPU, small
    python benchmarks/bench_styleid.py --sd-shaped --device cuda --size 512                        # GPU
    python benchmarks/bench_styleid.py --model runwayml/stable-diffusion-v1-5 --device cuda --size 512
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
from PIL import Image

from stylid_core.stylize.diffusion.config import DiffusionConfig
from stylid_core.stylize.diffusion.engine import (
    ContentPass,
    DiffusionStylizer,
    StyleFeatures,
    load_components,
    resolve_device_and_dtype,
)
from stylid_core.stylize.diffusion.sd_shaped import SD15_SHAPED_MODEL_NAME, build_sd15_shaped_components
from stylid_core.stylize.diffusion.tiny import DiffusionComponents, build_tiny_components

IMG2IMG_DEFAULT_STRENGTH = 0.8
IMG2IMG_DEFAULT_GUIDANCE = 7.5


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


class UNetPasses:
    """Counts UNet evaluations (a call on a batch of B counts B) with a forward pre-hook."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.count = 0
        unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        self.count += int((args[0] if args else kwargs["sample"]).shape[0])


def measure(name: str, device: torch.device, n_images: int, passes: UNetPasses, fn: Callable[[], object]) -> dict:
    gc.collect()
    passes.count = 0
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    row = {
        "name": name,
        "s_per_image": seconds / n_images,
        "peak_mib": mem.peak_bytes / 2**20,
        "passes": passes.count / n_images,
    }
    print(f"  measured {name}: {row['s_per_image']:.3f} s/image", flush=True)
    return row


def official_flow(engine: DiffusionStylizer, contents, style, workdir: str, written: list[int] | None = None):
    """StyleID's published flow, one image at a time: invert both, pickle the features to disk, reload, sample.

    Returns the stylized images; ``written`` gets the bytes of feature files written per image.
    """
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
        if written is not None:
            written.append(sum(os.path.getsize(os.path.join(workdir, f"{w}_{i}.pt")) for w in ("style", "content")))
        s = torch.load(os.path.join(workdir, f"style_{i}.pt"), map_location=engine.device)
        c = torch.load(os.path.join(workdir, f"content_{i}.pt"), map_location=engine.device)
        features = StyleFeatures("official", s["k"], s["v"], s["z_T"])
        content_pass = ContentPass(c["q"], None, None, c["trajectory"])
        z_T = engine.adain(c["trajectory"][engine.schedule.timesteps[0]], s["z_T"])
        latents = engine.sample(z_T, features, content_pass, None)
        image = engine.decode(latents)[0]
        outputs.append(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
    return outputs


def build_components(args) -> tuple[DiffusionComponents, str, torch.device, torch.dtype]:
    """One copy of the model for every method: (components, model option, device, dtype)."""
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    if args.sd_shaped:
        return build_sd15_shaped_components(), SD15_SHAPED_MODEL_NAME, device, dtype
    if args.model == "tiny":
        return build_tiny_components(), "tiny", device, dtype
    return load_components(DiffusionConfig(model=args.model), dtype), args.model, device, dtype


def img2img_pipeline(parts: DiffusionComponents, device: torch.device):
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDIMScheduler.from_config(parts.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (in-process random model) or an SD folder/hub id")
    parser.add_argument("--sd-shaped", action="store_true", help="SD-1.5-shaped model with random weights")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto (float16 on CUDA, float32 on CPU), float32, bfloat16")
    parser.add_argument("--size", type=int, default=64, help="working resolution (px, square images)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--n-content", type=int, default=8)
    parser.add_argument("--strides", default="1,2,3", help="ours: the inversion_stride of each row")
    parser.add_argument("--workdir", default=None, help="where the official flow writes its feature files")
    args = parser.parse_args(argv)
    strides = sorted({int(s) for s in args.strides.split(",")} | {1})

    parts, model, device, dtype = build_components(args)
    options = dict(
        model=model,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        resolution=args.size,
        steps=args.steps,
        batch_size=args.batch,
    )
    engines, processors = {}, {}
    for stride in strides:
        engines[stride] = DiffusionStylizer(components=parts, **options, inversion_stride=stride)
        processors[stride] = dict(parts.unet.attn_processors)  # each engine's own; reinstalled before it runs
    engine = engines[1]
    from diffusers.models.attention_processor import AttnProcessor2_0

    def use(stride: int | None) -> None:
        parts.unet.set_attn_processor(dict(processors[stride]) if stride else AttnProcessor2_0())

    pipe = img2img_pipeline(parts, device)
    contents = _images(args.n_content, args.size, seed=1)
    style = _images(1, args.size, seed=2)[0]
    pil = [Image.fromarray(c) for c in contents]
    n, n_c = args.steps, len(contents)

    def ours(stride: int) -> Callable[[], None]:
        def run() -> None:
            use(stride)
            engines[stride].style_cache.clear()  # the style is inverted once per run, inside the timing
            engines[stride].stylize_batch(contents, [style] * n_c)

        return run

    def img2img(strength: float, guidance: float) -> Callable[[], None]:
        def run() -> None:
            use(None)
            for start in range(0, len(pil), args.batch):
                chunk = pil[start : start + args.batch]
                pipe(
                    prompt=[""] * len(chunk),
                    image=chunk,
                    strength=strength,
                    num_inference_steps=n,
                    guidance_scale=guidance,
                    output_type="np",
                )

        return run

    def warm_up(workdir: str) -> None:
        if device.type == "cuda":  # every method once: kernels, allocator, lazy module loading
            for stride in strides:
                use(stride)
                engines[stride].stylize_batch(contents[:1], [style])
            use(1)
            official_flow(engine, contents[:1], style, workdir)
            img2img(1.0, 1.0)()
            return
        # CPU: one UNet call per batch shape and one VAE round trip (a full pass per method would double the run)
        use(None)
        with torch.no_grad():
            z = engine.encode(engine._to_tensor(contents[:1], engine.working_size(args.size, args.size)))
            for b in sorted({1, min(args.batch, n_c), 2 * min(args.batch, n_c)}):
                engine._unet_call(z.expand(b, -1, -1, -1), engine.schedule.timesteps[0])
            engine.decode(z)

    with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
        warm_up(workdir)

        written: list[int] = []

        def official() -> None:
            use(1)
            official_flow(engine, contents, style, workdir, written)

        passes = UNetPasses(parts.unet)
        rows = []
        for stride in strides:
            name = f"ours, inversion_stride {stride}" + (" (batched, in-memory style)" if stride == 1 else "")
            rows.append(measure(name, device, n_c, passes, ours(stride)))
        rows.append(measure("(a) img2img strength 1.0, no CFG", device, n_c, passes, img2img(1.0, 1.0)))
        defaults = img2img(IMG2IMG_DEFAULT_STRENGTH, IMG2IMG_DEFAULT_GUIDANCE)
        rows.append(measure("(a') img2img defaults: strength 0.8, CFG 7.5", device, n_c, passes, defaults))
        rows.append(measure("(b) StyleID official flow (disk features)", device, n_c, passes, official))

    on_gpu = device.type == "cuda"
    print()
    if not on_gpu:
        print("*** RAN ON CPU - no GPU in this session: figures show the shape of the costs only; the GPU targets")
        print("*** (ours <= 1.5x img2img, >= 10x faster than the official flow) apply to SD 1.5 on a GPU.")
    name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {name} | model: {engine.model} | dtype: {str(engine.dtype).removeprefix('torch.')} | "
        f"size {args.size} | steps {n} | batch {args.batch} | contents {n_c} | "
        f"injected layers {len(engine.layers)} | no faces (consistency guidance idle)"
    )
    mem_kind = "peak GPU MiB" if on_gpu else "peak RSS MiB"
    print(f"{'method':<50} {'s/image':>10} {mem_kind:>14} {'UNet passes/image':>18}")
    for row in rows:
        print(f"{row['name']:<50} {row['s_per_image']:>10.3f} {row['peak_mib']:>14.1f} {row['passes']:>18.1f}")
    ours_rows, (strict, default, off) = rows[: len(strides)], rows[len(strides) :]
    header = "".join(f"{'stride ' + str(s):>11}" for s in strides)
    print(f"{'time ratios':<50}{header}")
    lines = [
        ("ours / (a) img2img strict", [r["s_per_image"] / strict["s_per_image"] for r in ours_rows], "<= 1.5x"),
        ("ours / (a') img2img defaults", [r["s_per_image"] / default["s_per_image"] for r in ours_rows], None),
        ("(b) official / ours", [off["s_per_image"] / r["s_per_image"] for r in ours_rows], ">= 10x"),
    ]
    for label, ratios, target in lines:
        cells = "".join(f"{f'{r:.2f}x':>11}" for r in ratios)
        print(f"{label:<50}{cells}" + (f"   (target on GPU: {target})" if target else ""))
    features = next(iter(engine.style_cache._items.values()), None)
    if features is not None:
        print(
            f"style features cached in memory (stride 1): {features.nbytes / 2**20:.1f} MiB; "
            f"(b) wrote {np.mean(written) / 2**20:.1f} MiB of feature files per image"
        )


if __name__ == "__main__":
    main()
