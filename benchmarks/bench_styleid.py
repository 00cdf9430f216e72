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
- **(b) StyleID official flow**, as ``run_styleid.py`` publishes it on a fresh run (no precomputed features): the
  style DDIM-inverted once, recording the self-attention queries, keys and values of the injected layers at every
  timestep, its features pickled to disk; then one content image at a time (batch 1): DDIM-inverted the same way,
  sampled with the style's keys/values and its own queries injected, decoded, its features pickled to disk
  (``torch.save``). In its own precision (``--official-precision published``, the default): full-precision (float32)
  weights, the inversions in float32 and the sampling and decoding under ``torch.autocast`` (float16) on CUDA; on
  a CPU the published autocast does nothing, so all of it is float32. ``--official-precision engine`` runs it in
  the engine's dtype instead. Its attention is this project's (SDPA); the published code's ldm attention
  materialises every score matrix, so on a GPU the measured ratio is a lower bound for the published code.

Every method runs on the same UNet/VAE/text encoder (one copy in memory; the attention processors are swapped in
before each method), except (b) in its published precision when the engine's dtype is not float32: (b) then gets
its own float32 copy. The images carry no faces, so the content consistency guidance is idle. The ``UNet
passes/image`` column counts the UNet evaluations each method made per image (a batch of B counts B).

Targets on a GPU with SD 1.5 at 512 px: ours <= 1.5x (a), >= 10x faster than (b). ``--sd-shaped`` builds an
SD-1.5-shaped model with random weights in-process (true per-call cost, nothing downloaded). On a CPU the figures
only show the shape of the costs; the table says which device ran.

    python benchmarks/bench_styleid.py                                   # tiny model on CPU
    python benchmarks/bench_styleid.py --sd-shaped --size 256 --steps 10 --batch 2 --n-content 2   # CPU, small
    python benchmarks/bench_styleid.py --sd-shaped --device cuda --size 512                        # GPU
    python benchmarks/bench_styleid.py --model runwayml/stable-diffusion-v1-5 --device cuda --size 512

``--json PATH`` also writes every figure (with the device's name, torch's version and each method's dtype) there.
"""

from __future__ import annotations

import argparse
import gc
import json
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
    """Counts UNet evaluations (a call on a batch of B counts B) with a forward pre-hook on each UNet."""

    def __init__(self, *unets: torch.nn.Module) -> None:
        self.count = 0
        for unet in {id(u): u for u in unets}.values():
            unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        self.count += int((args[0] if args else kwargs["sample"]).shape[0])


def measure(
    name: str, device: torch.device, n_images: int, passes: UNetPasses, fn: Callable[[], object], dtype: str
) -> dict:
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
        "dtype": dtype,
    }
    print(f"  measured {name}: {row['s_per_image']:.3f} s/image", flush=True)
    return row


def official_flow(
    engine: DiffusionStylizer, contents, style, workdir: str, autocast: bool, written: list[int] | None = None
):
    """StyleID's published flow on a fresh run: the style inverted once and its features pickled to disk, then one
    content at a time inverted (q, k, v recorded at every injected timestep), sampled (under float16 autocast when
    ``autocast``), decoded and its features pickled to disk. Inversions run in the engine's own dtype.

    Returns the stylized images; ``written`` gets the bytes of the feature files: the style's first, then each
    content's. A content's file is deleted once written and measured (its bytes went through ``torch.save``), so
    a long run does not fill the disk.
    """
    first = engine.schedule.timesteps[0]
    style_latent = engine.encode(engine._to_tensor([style], engine.working_size(*style.shape[:2])))
    style_traj, style_rec = engine._invert_recording(style_latent, ("q", "k", "v"))
    style_path = os.path.join(workdir, "style.pt")
    torch.save({"features": style_rec, "trajectory": style_traj}, style_path)
    if written is not None:
        written.append(os.path.getsize(style_path))
    features = StyleFeatures("official", style_rec["k"], style_rec["v"], style_traj[first])
    outputs = []
    for i, content in enumerate(contents):
        content_latent = engine.encode(engine._to_tensor([content], engine.working_size(*content.shape[:2])))
        content_traj, content_rec = engine._invert_recording(content_latent, ("q", "k", "v"))
        content_pass = ContentPass(content_rec["q"], None, None, content_traj)
        z_T = engine.adain(content_traj[first], features.z_T)
        with torch.autocast(engine.device.type, dtype=torch.float16, enabled=autocast):
            latents = engine.sample(z_T, features, content_pass, None)
            image = engine.decode(latents)[0]
        outputs.append(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy())
        path = os.path.join(workdir, f"content_{i}.pt")
        torch.save({"features": content_rec, "trajectory": content_traj}, path)
        if written is not None:
            written.append(os.path.getsize(path))
        os.remove(path)
        del content_rec, content_traj, content_pass
    return outputs


def build_components(
    args, dtype: torch.dtype | None = None
) -> tuple[DiffusionComponents, str, torch.device, torch.dtype]:
    """One copy of the model for every method: (components, model option, device, dtype); ``dtype`` overrides the
    ``--dtype`` option (the official flow's float32 copy)."""
    device, resolved = resolve_device_and_dtype(args.device, args.dtype)
    dtype = dtype or resolved
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
    parser.add_argument(
        "--official-precision",
        default="published",
        choices=("published", "engine"),
        help="(b)'s precision: as published (float32, sampling under float16 autocast on CUDA) or the engine's dtype",
    )
    parser.add_argument("--json", default=None, help="also write every figure to this file")
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
    # (b): as published it keeps float32 weights (its own copy when ours runs in another dtype) and samples under
    # float16 autocast on CUDA; on a CPU the published autocast("cuda") is a no-op, so it is float32 throughout
    published = args.official_precision == "published"
    official_autocast = published and device.type == "cuda"
    if published and dtype != torch.float32:
        parts_off = build_components(args, torch.float32)[0]
        official_engine = DiffusionStylizer(components=parts_off, **{**options, "dtype": "float32"})
        official_processors = dict(parts_off.unet.attn_processors)
    else:
        parts_off, official_engine, official_processors = parts, engine, processors[1]
    official_dtype = str(official_engine.dtype).removeprefix("torch.") + (
        " (sampling and decoding under float16 autocast)" if official_autocast else ""
    )
    from diffusers.models.attention_processor import AttnProcessor2_0

    def use(stride: int | None) -> None:
        parts.unet.set_attn_processor(dict(processors[stride]) if stride else AttnProcessor2_0())

    def use_official() -> None:
        parts_off.unet.set_attn_processor(dict(official_processors))

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
            use_official()
            official_flow(official_engine, contents[:1], style, workdir, official_autocast)
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
            use_official()
            official_flow(official_engine, contents, style, workdir, official_autocast, written)

        passes = UNetPasses(parts.unet, parts_off.unet)
        ours_dtype = str(engine.dtype).removeprefix("torch.")
        rows = []
        for stride in strides:
            name = f"ours, inversion_stride {stride}" + (" (batched, in-memory style)" if stride == 1 else "")
            rows.append(measure(name, device, n_c, passes, ours(stride), ours_dtype))
        rows.append(measure("(a) img2img strength 1.0, no CFG", device, n_c, passes, img2img(1.0, 1.0), ours_dtype))
        defaults = img2img(IMG2IMG_DEFAULT_STRENGTH, IMG2IMG_DEFAULT_GUIDANCE)
        rows.append(measure("(a') img2img defaults: strength 0.8, CFG 7.5", device, n_c, passes, defaults, ours_dtype))
        rows.append(measure("(b) StyleID official flow (batch 1, disk features)", device, n_c, passes, official,
                            official_dtype))  # fmt: skip

    on_gpu = device.type == "cuda"
    print()
    if not on_gpu:
        print("*** RAN ON CPU - no GPU in this session: figures show the shape of the costs only; the GPU targets")
        print("*** (ours <= 1.5x img2img, >= 10x faster than the official flow) apply to SD 1.5 on a GPU.")
    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"device: {device_name} | model: {engine.model} | dtype: {str(engine.dtype).removeprefix('torch.')} | "
        f"size {args.size} | steps {n} | batch {args.batch} | contents {n_c} | "
        f"injected layers {len(engine.layers)} | no faces (consistency guidance idle)"
    )
    mem_kind = "peak GPU MiB" if on_gpu else "peak RSS MiB"
    print(f"{'method':<50} {'s/image':>10} {mem_kind:>14} {'UNet passes/image':>18}  dtype")
    for row in rows:
        print(
            f"{row['name']:<50} {row['s_per_image']:>10.3f} {row['peak_mib']:>14.1f} {row['passes']:>18.1f}"
            f"  {row['dtype']}"
        )
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
    cached_mib = features.nbytes / 2**20 if features is not None else None
    style_file, content_files = (written[0], written[1:]) if written else (0, [0])
    if features is not None:
        print(
            f"style features cached in memory (stride 1): {cached_mib:.1f} MiB; (b) wrote "
            f"{style_file / 2**20:.1f} MiB for the style and {np.mean(content_files) / 2**20:.1f} MiB per content"
        )
    if args.json:
        report = {
            "device": str(device),
            "device_name": device_name,
            "torch": torch.__version__,
            "model": engine.model,
            "dtype": ours_dtype,
            "official_dtype": official_dtype,
            "official_precision": args.official_precision,
            "size": args.size,
            "steps": n,
            "batch": args.batch,
            "n_content": n_c,
            "strides": strides,
            "injected_layers": len(engine.layers),
            "methods": rows,
            "ratios": {label: {f"stride_{s}": r for s, r in zip(strides, ratios)} for label, ratios, _ in lines},
            "targets": {"ours / (a) img2img strict": "<= 1.5", "(b) official / ours": ">= 10"},
            "style_features_cached_mib": cached_mib,
            "official_style_file_mib": style_file / 2**20,
            "official_content_file_mib": float(np.mean(content_files)) / 2**20,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
