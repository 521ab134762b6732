"""The bench job: rate–distortion–perception curves and speed for codecs on a folder of images.

    --codec specs ─► curves of points (codec + parameters) ─► per point, per image: encode, decode,
    bpp from the real stream, PSNR / MS-SSIM / LPIPS ─► per-point means ─► BD-rates against the
    reference curve ─► results.json, results.csv, plots, crops and report.html under --out

It runs in this process, not on Ray: a benchmark wants one codec at a time on a quiet device, so that
its seconds per image mean something. The images are loaded once and kept in memory, which suits the
evaluation sets a benchmark runs on (Kodak: 24 images), not whole archives.

Choices the issue left open, written down here:
- Timing: every image is encoded and decoded alone (batch of 1), timed around `codec.encode` /
  `codec.decode`. The first image of each codec's first point is run once untimed beforehand, so
  one-off start-up (lazy loads, kernel selection) is not billed to the first image.
- Means are over images (mean of per-image bpp, PSNR, …); LPIPS over the images it is defined for
  (shorter side ≥ 17 px). A curve is its points' (mean bpp, mean metric), sorted by bpp.
- The reference (`--reference`, default avif) is a curve that was asked for — matched by its spec, or
  else by codec name — or, if none matches, the reference spec is added to the run.
- Gallery: the first N images (in key order); for each curve the point whose mean bpp is nearest (in
  log scale) to the reference curve's median point. Crops are 256×256 from the image centre, labelled
  with that image's own bpp, PSNR and LPIPS (of the whole image, not the crop).
- Throughput: per curve, at its gallery point; each batch is the first image repeated, so every batch
  size sees the same pixels. See `PeakMemory` for what "peak memory" means on each device.
"""

from __future__ import annotations

import math
import os
import platform
import posixpath
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...codecs.base import Codec
from ...codecs.registry import create_codec
from ..archive import tool_version
from .bdrate import bd_rate, interpolation_for
from ...codecs.errors import ImageLoadError, SourceError
from ..images import DEFAULT_MAX_PIXELS, load_rgb
from ...codecs.parts.metrics import LPIPS, LPIPS_MIN_SIDE, find_lpips_weights, ms_ssim, psnr
from .report import write_outputs
from .specs import Curve, Point, parse_codec_spec, resolve_reference
from ..sources import fetch, list_sources
from ..storage import Location
from .throughput import measure_throughput

# Metrics a curve is compared on; LPIPS is a distance, lower is better (BD-rate negates it).
METRICS = {"psnr": True, "ms_ssim": True, "lpips": False}
CROP_SIDE = 256


@dataclass
class BenchOptions:
    dataset: str
    specs: Sequence[str]
    reference: str = "avif"
    out: str = "bench-out"
    lpips_weights: str | None = None
    limit: int | None = None
    gallery: int = 3
    gallery_bpp: float | None = None  # the rate the gallery matches; None: the reference's median point
    throughput: bool = False
    batch_sizes: Sequence[int] = (1, 4, 8)
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS


def run_bench(options: BenchOptions, log: Callable[[str], None] = print) -> dict:
    """Run every point on every image, write the output folder, and return the results (as in results.json)."""
    started = time.perf_counter()
    requested = list({c.name: c for c in map(parse_codec_spec, options.specs)}.values())
    curves, reference = resolve_reference(requested, options.reference)
    log(f"reference curve: {reference.name}" + ("" if reference in requested else " (added to the run)"))
    weights = find_lpips_weights(options.lpips_weights)
    if weights is None:
        log("notice: no LPIPS weights (--lpips-weights or $DIFFARC_LPIPS_WEIGHTS); LPIPS is left empty")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lpips = LPIPS(weights, device) if weights else None

    keys, images, skipped = load_images(options, log)
    boxes = [centre_crop_box(image) for image in images[: options.gallery]]
    rows, curve_results, crops = measure_curves(curves, keys, images, lpips, boxes, device, log)
    reference_result = next(c for c in curve_results if c["name"] == reference.name)
    gallery, crop_images = choose_gallery(
        curve_results, reference_result, keys, images, boxes, crops, rows, options.gallery_bpp
    )  # fmt: skip
    results = {
        "run": describe_run(device, options, weights),
        "dataset": options.dataset,
        "images": len(images),
        "skipped": skipped,
        "reference": reference.name,
        "curves": curve_results,
        "bd_rate": bd_rates(curve_results, reference_result, lpips is not None),
        "gallery": gallery,
        "throughput": None,
        "rows": rows,
    }
    if options.throughput:
        picks = {c["curve"]: c["label"] for c in gallery["curves"]}
        points = [(c.name, p) for c in curves for p in c.points if picks[c.name] == p.label]
        results["throughput"] = measure_throughput(points, images[0], options.batch_sizes, device, log)
    results["run"]["seconds"] = round(time.perf_counter() - started, 1)
    results = json_safe(results)
    write_outputs(Location(options.out), results, crop_images)
    return results


def measure_curves(curves: list[Curve], keys, images, lpips: LPIPS | None, boxes, device: str, log):
    """Every point of every curve on every image: the per-image rows, the curves of per-point means
    (sorted by bpp), and the gallery crops of each point, keyed by (curve, label)."""
    rows, curve_results, crops = [], [], {}
    warmed: set[str] = set()
    for curve in curves:
        summaries = []
        for point in curve.points:
            codec = create_codec(point.codec, point.params, device=device)
            if point.codec not in warmed:
                codec.decode(codec.encode(images[:1]))
                warmed.add(point.codec)
            tick = time.perf_counter()
            point_rows, crops[curve.name, point.label] = measure_point(codec, keys, images, lpips, boxes)
            rows += [{"curve": curve.name, "codec": point.codec, "label": point.label, **r} for r in point_rows]
            summaries.append(summarize_point(curve, point, point_rows))
            log(f"{curve.name} [{point.label}]: {summaries[-1]['bpp']:.3f} bpp, {summaries[-1]['psnr']:.2f} dB "
                f"({time.perf_counter() - tick:.1f} s)")  # fmt: skip
        summaries.sort(key=lambda s: s["bpp"])
        curve_results.append({"name": curve.name, "codec": curve.codec, "points": summaries})
    return rows, curve_results, crops


def load_images(options: BenchOptions, log: Callable[[str], None]) -> tuple[list[str], list[np.ndarray], list[dict]]:
    """The dataset's images, decoded once; files that do not load are skipped and reported."""
    items = list_sources(options.dataset, options.storage_options).items[: options.limit]
    keys, images, skipped = [], [], []
    for item in items:
        try:
            images.append(load_rgb(fetch(item, options.storage_options), options.max_pixels))
            keys.append(item.key)
        except (ImageLoadError, OSError) as exc:
            skipped.append({"key": item.key, "reason": str(exc)})
            log(f"skipped {item.key}: {exc}")
    if not images:
        raise SourceError(f"no loadable images under {options.dataset}")
    log(f"{len(images)} images from {options.dataset}")
    return keys, images, skipped


def centre_crop_box(image: np.ndarray, side: int = CROP_SIDE) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a side×side square at the image centre, or the whole image if smaller."""
    height, width = min(side, image.shape[0]), min(side, image.shape[1])
    return (image.shape[0] - height) // 2, (image.shape[1] - width) // 2, height, width


def crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    top, left, height, width = box
    return image[top : top + height, left : left + width]


def measure_point(codec: Codec, keys: list[str], images: list[np.ndarray], lpips: LPIPS | None, boxes: list):
    """Per-image rows for one codec setting, and the reconstructions' crops of the gallery images."""
    rows, crops = [], []
    for index, (key, image) in enumerate(zip(keys, images)):
        tick = time.perf_counter()
        [stream] = codec.encode([image])
        encoded = time.perf_counter()
        [decoded] = codec.decode([stream])
        decoded_at = time.perf_counter()
        height, width = image.shape[:2]
        rows.append({
            "key": key,
            "width": width,
            "height": height,
            "bytes": len(stream),
            "bpp": 8 * len(stream) / (width * height),
            "psnr": psnr(image, decoded),
            "ms_ssim": ms_ssim(image, decoded),
            "lpips": lpips(image, decoded) if lpips is not None and min(height, width) >= LPIPS_MIN_SIDE else None,
            "encode_s": encoded - tick,
            "decode_s": decoded_at - encoded,
            "stream_stats": codec.stream_stats(stream),
        })  # fmt: skip
        if index < len(boxes):
            crops.append(crop(decoded, boxes[index]).copy())
    return rows, crops


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarize_point(curve: Curve, point: Point, rows: list[dict]) -> dict:
    encode_s, decode_s = _mean([r["encode_s"] for r in rows]), _mean([r["decode_s"] for r in rows])
    return {
        "curve": curve.name,
        "codec": point.codec,
        "label": point.label,
        "params": point.params,
        "images": len(rows),
        **{k: _mean([r[k] for r in rows]) for k in ("bpp", *METRICS)},
        "encode_s_per_image": encode_s,
        "decode_s_per_image": decode_s,
        "encode_images_per_s": 1 / encode_s if encode_s else None,
        "decode_images_per_s": 1 / decode_s if decode_s else None,
        "stream_stats": {k: _mean([r["stream_stats"][k] for r in rows]) for k in rows[0]["stream_stats"]} if rows else {},
    }


def bd_rates(curves: list[dict], reference: dict, with_lpips: bool) -> dict:
    """BD-rate (%) of each curve against the reference, per metric; None where the curves do not overlap."""
    table = {}
    for curve in curves:
        entry = {"interpolation": interpolation_for(len(reference["points"]), len(curve["points"]))}
        for metric, higher_is_better in METRICS.items():
            if metric == "lpips" and not with_lpips:
                entry[metric] = None
                continue
            entry[metric] = bd_rate(
                [p["bpp"] for p in reference["points"]], [p[metric] for p in reference["points"]],
                [p["bpp"] for p in curve["points"]], [p[metric] for p in curve["points"]],
                higher_is_better,
            )  # fmt: skip
        table[curve["name"]] = entry
    return table


def choose_gallery(
    curves, reference, keys, images, boxes, crops, rows, target: float | None = None
) -> tuple[dict, dict[str, np.ndarray]]:  # fmt: skip
    """For each curve the point nearest `target` bpp (default: the reference's median point); the crops
    to show, by file name."""
    described = f"--gallery-bpp {target:g}" if target else "the reference's median point"
    target = target or statistics.median_low([p["bpp"] for p in reference["points"]])
    picks = []
    for curve in curves:
        point = min(curve["points"], key=lambda p: abs(math.log(p["bpp"] / target)))
        picks.append({"curve": curve["name"], "label": point["label"], "bpp": point["bpp"]})
    files, entries = {}, []
    by_key = {(r["curve"], r["label"], r["key"]): r for r in rows}
    for index, box in enumerate(boxes):
        stem = f"gallery/{index:02d}-{_slug(posixpath.splitext(keys[index])[0])}"
        files[f"{stem}-original.png"] = crop(images[index], box)
        entry = {"key": keys[index], "box": list(box), "original": f"{stem}-original.png", "crops": []}
        for number, pick in enumerate(picks):
            name = f"{stem}-{number}-{_slug(pick['curve'])}.png"  # the number keeps look-alike specs apart
            files[name] = crops[pick["curve"], pick["label"]][index]
            row = by_key[pick["curve"], pick["label"], keys[index]]
            entry["crops"].append({"curve": pick["curve"], "label": pick["label"], "file": name,
                                   **{k: row[k] for k in ("bpp", "psnr", "lpips")}})  # fmt: skip
        entries.append(entry)
    return {"target_bpp": target, "target": described, "curves": picks, "images": entries}, files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


def describe_run(device: str, options: BenchOptions, weights) -> dict:
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "diffarc": tool_version(),
        "lpips_weights": str(weights) if weights else None,
        "options": {k: v for k, v in asdict(options).items() if k != "storage_options"},
    }


def json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats (PSNR of a lossless point) become None, tuples lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def summary(results: dict) -> dict:
    """What --json prints: the points, BD-rates and throughput; not the per-image rows or the gallery."""
    return {k: v for k, v in results.items() if k not in ("rows", "gallery")}
