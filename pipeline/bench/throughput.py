"""Speed of codecs: images/s and peak memory for encode and decode at several batch sizes, and, on a
GPU, forward passes/s of a Stable Diffusion 2.1-sized UNet with random weights — a fair speed figure
for diffusion codecs that needs no weights.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...codecs.registry import create_codec

THROUGHPUT_REPEATS = 3


class PeakMemory:
    """Peak memory over a block of work.

    GPU: `torch.cuda.max_memory_allocated`, its peak reset at the block's start — everything torch
    holds on the device, the model's weights included. CPU: the whole process's peak resident set size
    during the block (Linux VmHWM, reset at the block's start through /proc/self/clear_refs), so it
    includes what the bench itself holds (the loaded images, LPIPS, libraries). A difference against
    the start would read ~0: after the warm-up the allocator reuses memory the process already has.
    Where the peak cannot be reset, the process's lifetime peak (`ru_maxrss`).
    """

    def __init__(self, device: str):
        self.device = device
        if device == "cuda":
            self.kind = "torch.cuda.max_memory_allocated (weights included)"
        elif _reset_peak_rss():
            self.kind = "process peak RSS during the block (VmHWM, whole process)"
        else:
            self.kind = "process lifetime peak RSS (ru_maxrss)"

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self.peak_bytes = _peak_rss_bytes()


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(work: Callable[[], Any], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - tick


def measure_throughput(points, image: np.ndarray, batch_sizes: Sequence[int], device: str, log) -> dict:
    """Images/s and peak memory of encode and decode per batch size; on a GPU also the SD-2.1 UNet."""
    results = []
    memory_kind = None
    for curve, point in points:
        codec = create_codec(point.codec, point.params, device=device)
        for size in batch_sizes:
            batch = [image] * size
            streams = codec.encode(batch)  # warm-up, and the streams to decode
            codec.decode(streams)
            entry = {"curve": curve, "label": point.label, "batch_size": size}
            for step, work in (("encode", lambda: codec.encode(batch)), ("decode", lambda: codec.decode(streams))):
                with PeakMemory(device) as memory:
                    seconds = statistics.median(_timed(work, device) for _ in range(THROUGHPUT_REPEATS))
                entry[f"{step}_images_per_s"] = size / seconds
                entry[f"{step}_peak_memory_bytes"] = memory.peak_bytes
                memory_kind = memory.kind
            log(f"throughput {curve} [{point.label}] batch {size}: encode {entry['encode_images_per_s']:.1f} img/s, "
                f"decode {entry['decode_images_per_s']:.1f} img/s")  # fmt: skip
            results.append(entry)
    return {
        "device": device,
        "image_size": list(image.shape[:2]),
        "memory": memory_kind,
        "codecs": results,
        "sd21_unet": measure_sd21_unet(batch_sizes, device, log),
    }


def measure_sd21_unet(batch_sizes: Sequence[int], device: str, log) -> dict:
    """Forward passes/s of a Stable Diffusion 2.1-sized UNet with random weights, fp16: a speed yardstick
    for diffusion codecs that needs no weights. GPU only; on a CPU it would take minutes per pass."""
    if device != "cuda":
        log("notice: SD-2.1 UNet timing skipped: no GPU (a CPU forward pass would take far too long)")
        return {"skipped": "no GPU"}
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024, use_linear_projection=True,
        ).to(torch.float16).eval()  # fmt: skip
    results = []
    for size in batch_sizes:
        sample = torch.randn(size, 4, 64, 64, device="cuda", dtype=torch.float16)
        context = torch.randn(size, 77, 1024, device="cuda", dtype=torch.float16)
        timestep = torch.full((size,), 500, device="cuda")
        step = lambda: unet(sample, timestep, encoder_hidden_states=context)  # noqa: E731
        with torch.inference_mode():
            for _ in range(3):
                step()
            with PeakMemory("cuda") as memory:
                seconds = statistics.median(_timed(step, "cuda") for _ in range(10))
        results.append({"batch_size": size, "forward_passes_per_s": 1 / seconds,
                        "latents_per_s": size / seconds, "peak_memory_bytes": memory.peak_bytes})  # fmt: skip
        log(f"SD-2.1 UNet fp16 batch {size}: {1 / seconds:.2f} forward passes/s")
    return {
        "config": "SD-2.1 UNet2DConditionModel, random weights, fp16, "
        "4×64×64 latents (512² images), 77×1024 text context",
        "parameters": sum(p.numel() for p in unet.parameters()),
        "results": results,
    }
