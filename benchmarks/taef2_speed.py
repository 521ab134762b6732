"""taef2 on the CPU: multiply-adds per Kodak image, seconds per image, and the share of the machine's peak.

    python benchmarks/taef2_speed.py [--threads 2] [--images 4] [--variants shipped,nchw,bf16]

Counts the multiply-adds of every convolution and matrix product of taef2's decoder and encoder on a
768 × 512 Kodak image (forward hooks), then times decode and encode of the first `--images` Kodak images in
each variant, best of `--repeat`, and prints PSNR against the original so that a variant that changes the
pictures shows it. Each time is given in wall seconds (the share of the machine's peak) and in the
process's CPU seconds (the share of one core's peak per CPU-second busy): on a shared machine the wall time
measures the other jobs; with `--threads 1` the CPU time is the work alone. Variants:
- shipped: the module as codecs use it (channels_last, pool products on one thread, halo tiles),
  under torch.inference_mode;
- nchw: the same layers run as one plain nn.Sequential on NCHW tensors, no tiles (the module as first written);
- bf16: shipped under CPU autocast to bfloat16 (oneDNN emulates it where the CPU has no bf16 units).
The peak is cores × GHz × 2 FMA units × 16 float32 lanes (AVX-512): `--ghz` and `--fma-units` set it.
A large float32 matrix product is timed too: what this machine reaches at best.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffarc.codecs.parts.latents import images_to_tensor, tensor_to_images
from diffarc.codecs.parts.metrics import psnr
from diffarc.codecs.parts.models import load_model
from diffarc.codecs.parts.taef2 import Taef2Autoencoder

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"


def count_macs(module: torch.nn.Module, run) -> float:
    """Multiply-adds of the convolutions and linear layers `run()` calls through `module` (hooks count
    output elements × input channels × kernel taps), plus taef2's pool products, which bypass their modules."""
    total = [0.0]

    def conv_hook(layer, inputs, output):
        total[0] += output.numel() * layer.in_channels // layer.groups * layer.kernel_size[0] * layer.kernel_size[1]

    hooks = [m.register_forward_hook(conv_hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    linear = torch.nn.functional.linear

    def counting_linear(x, weight, bias=None):
        total[0] += x.numel() // x.shape[-1] * weight.shape[0] * weight.shape[1]
        return linear(x, weight, bias)

    torch.nn.functional.linear = counting_linear
    try:
        run()
    finally:
        torch.nn.functional.linear = linear
        for hook in hooks:
            hook.remove()
    return total[0]


def best_time(run, repeat: int) -> tuple[float, float]:
    """(wall, CPU) seconds of the fastest of `repeat` runs."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        run()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def plain_nchw(vae: Taef2Autoencoder) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The encoder and decoder as plain NCHW Sequentials (whole picture, no tiles)."""
    copied = copy.deepcopy(vae).to(memory_format=torch.contiguous_format)
    return copied.encoder, copied.decoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--variants", default="shipped,nchw,bf16")
    parser.add_argument("--kodak", default=str(KODAK))
    parser.add_argument("--ghz", type=float, default=2.3)
    parser.add_argument("--fma-units", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = args.threads * args.ghz * args.fma_units * 16  # GMAC/s

    vae = load_model("builtin:taef2").vae
    paths = sorted(Path(args.kodak).glob("*.png"))[: args.images]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    images = [im if im.shape[0] < im.shape[1] else np.ascontiguousarray(im.transpose(1, 0, 2)) for im in images]  # 512 × 768
    x = images_to_tensor(images[:1], images[0].shape[:2], "cpu", torch.float32)
    with torch.inference_mode():
        z = vae.encode(x).latents
        decoder_gmac = count_macs(vae, lambda: vae.decode(z)) / 1e9
        encoder_gmac = count_macs(vae, lambda: vae.encode(x)) / 1e9
    print(f"taef2 on {images[0].shape[1]}×{images[0].shape[0]}: decoder {decoder_gmac:.1f} GMAC, encoder {encoder_gmac:.1f} GMAC; "
          f"peak {peak:.0f} GMAC/s ({args.threads} cores × {args.ghz} GHz × {args.fma_units} FMA × 16 lanes)")  # fmt: skip

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    wall, cpu = best_time(lambda: a @ b, 3)
    print(f"float32 2048² matrix product: {2048**3 / wall / 1e9:.0f} GMAC/s ({2048**3 / wall / 1e9 / peak:.0%} of peak), "
          f"{2048**3 / cpu / 1e9:.0f} GMAC per CPU-s ({2048**3 / cpu / 1e9 / (peak / args.threads):.0%} of a core's peak)")

    encoder_nchw, decoder_nchw = plain_nchw(vae)
    variants = {
        "shipped": (lambda t: vae.encode(t).latents, lambda z: vae.decode(z).sample, torch.inference_mode),
        "nchw": (lambda t: encoder_nchw((t + 1) / 2), lambda z: decoder_nchw[1:](3 * torch.tanh(z / 3)).clamp(0, 1) * 2 - 1, torch.no_grad),
        "bf16": (lambda t: vae.encode(t).latents.float(), lambda z: vae.decode(z).sample.float(),
                 lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
    }  # fmt: skip
    for name in args.variants.split(","):
        encode, decode, context = variants[name]
        times = {"decode": [], "encode": []}
        scores = []
        for image in images:
            t = images_to_tensor([image], image.shape[:2], "cpu", torch.float32)
            with torch.inference_mode(), context():
                latent = encode(t)
                times["encode"].append(best_time(lambda: encode(t), args.repeat))
                times["decode"].append(best_time(lambda: decode(latent), args.repeat))
                scores.append(psnr(image, tensor_to_images(decode(latent), [image.shape[:2]])[0]))
        shown = []
        for part, gmac in (("decode", decoder_gmac), ("encode", encoder_gmac)):
            wall = float(np.mean([w for w, _ in times[part]]))
            cpu = float(np.mean([c for _, c in times[part]]))
            core = peak / args.threads
            shown.append(f"{part} {wall:.2f} s = {gmac / wall / peak:.0%} of peak; {cpu:.2f} CPU-s = {gmac / cpu / core:.0%} of a core's")
        print(f"{name:8s} {'; '.join(shown)}; PSNR {np.mean(scores):.3f} dB over {len(images)} images")


if __name__ == "__main__":
    main()
