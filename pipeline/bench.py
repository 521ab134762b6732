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

from ..codecs.base import Codec, Param
from ..codecs.registry import codec_class, create_codec
from .archive import tool_version
from .bdrate import bd_rate, interpolation_for
from .images import DEFAULT_MAX_PIXELS, ImageLoadError, load_rgb
from ..codecs.metrics import LPIPS, LPIPS_MIN_SIDE, find_lpips_weights, ms_ssim, psnr
from .report import write_outputs
from .sources import fetch, list_sources
from .storage import Location
from .throughput import measure_throughput

SPEC_HELP = """\
Each --codec is one curve:
  NAME              every preset (one point, the defaults, if none)
  NAME:PRESET       one point
  NAME:K=V,K=V      one point; a preset may come first: NAME:high,K=V
  NAME:K=A..B/N     N points from A to B inclusive, evenly spaced
                    (rounded for integer parameters)
  NAME:K=A|B|C      one point per listed value
One parameter per spec may sweep; the other items are fixed,
e.g. webp:method=6,quality=5..60/4"""

# Metrics a curve is compared on; LPIPS is a distance, lower is better (BD-rate negates it).
METRICS = {"psnr": True, "ms_ssim": True, "lpips": False}
CROP_SIDE = 256


class SpecError(ValueError):
    """A --codec or --reference spec that cannot be run; the message names the spec and the problem."""


@dataclass(frozen=True)
class Point:
    codec: str
    label: str  # what the user asked for at this point, e.g. "quality=30" or "high"
    params: dict[str, Any]  # every parameter, resolved


@dataclass(frozen=True)
class Curve:
    name: str  # the spec as given: unique within a run, used in legends and tables
    codec: str
    points: tuple[Point, ...]


def parse_codec_spec(spec: str) -> Curve:
    """One --codec spec (grammar in SPEC_HELP) → a curve of points with checked parameters."""
    spec = spec.strip()
    name, colon, rest = spec.partition(":")
    try:
        cls = codec_class(name)
    except ValueError as exc:
        raise SpecError(f"--codec {spec!r}: {exc}") from None
    if not colon:
        if not cls.presets:
            return Curve(spec, name, (Point(name, "defaults", cls.resolve_params({})),))
        return Curve(spec, name, tuple(Point(name, p, cls.resolve_params({}, p)) for p in cls.presets))
    try:
        preset, fixed, sweep = _parse_items(cls, rest)
        if sweep is None:
            settings = [(_label(preset, fixed), fixed)]
        else:
            key, values = sweep
            settings = [(_label(preset, {**fixed, key: v}), {**fixed, key: v}) for v in values]
        points = tuple(Point(name, label, cls.resolve_params(params, preset)) for label, params in settings)
    except ValueError as exc:
        raise SpecError(f"--codec {spec!r}: {exc}") from None
    return Curve(spec, name, points)


def _parse_items(cls: type[Codec], text: str):
    known = {p.name: p for p in cls.params}
    preset, fixed, sweep = None, {}, None
    for item in (i.strip() for i in text.split(",")):
        if not item:
            raise ValueError("empty item; expected PRESET or K=V items separated by commas")
        key, equals, value = (s.strip() for s in item.partition("="))
        if not equals:
            if preset is not None:
                raise ValueError(f"two presets ({preset!r}, {item!r}); give at most one")
            preset = item
            continue
        if key not in known:
            raise ValueError(f"codec {cls.name!r} has no parameter {key!r}; it takes {sorted(known)}")
        if ".." in value or "|" in value:
            if sweep is not None:
                raise ValueError(f"sweeps both {sweep[0]!r} and {key!r}; a curve sweeps one parameter")
            sweep = (key, _sweep_values(known[key], value))
        else:
            fixed[key] = known[key].parse(value)
    return preset, fixed, sweep


_RANGE = re.compile(r"^(?P<start>[-+]?[\d.]+)\.\.(?P<stop>[-+]?[\d.]+)/(?P<count>\d+)$")


def _sweep_values(param: Param, text: str) -> list:
    if "|" in text:
        items = [v.strip() for v in text.split("|")]
        if any(not v for v in items):
            raise ValueError(f"malformed list {text!r} for {param.name!r}: expected A|B|C")
        values = [param.parse(v) for v in items]
    else:
        match = _RANGE.match(text.replace(" ", ""))
        if not match:
            raise ValueError(f"malformed range {text!r} for {param.name!r}: expected START..STOP/COUNT, e.g. 10..90/5")
        if param.kind not in (int, float):
            raise ValueError(f"a range needs a numeric parameter; {param.name!r} is a {param.kind.__name__}")
        try:
            start, stop = float(match["start"]), float(match["stop"])
        except ValueError:
            raise ValueError(f"malformed range {text!r} for {param.name!r}: START and STOP must be numbers") from None
        count = int(match["count"])
        if count < 2 or start == stop:
            raise ValueError(f"range {text!r} for {param.name!r} needs START != STOP and COUNT >= 2")
        spaced = np.linspace(start, stop, count)
        values = [param.parse(round(v) if param.kind is int else float(v)) for v in spaced]
    if len(set(values)) != len(values):
        raise ValueError(f"{param.name}={text} gives repeated values {values}")
    return values


def _label(preset: str | None, params: dict[str, Any]) -> str:
    parts = ([preset] if preset else []) + [f"{k}={v}" for k, v in params.items()]
    return ",".join(parts) or "defaults"


def resolve_reference(curves: list[Curve], reference: str) -> tuple[list[Curve], Curve]:
    """The reference curve among `curves` (by spec, else by codec), or parsed from `reference` and added."""
    for match in (lambda c: c.name == reference, lambda c: c.codec == reference):
        for curve in curves:
            if match(curve):
                return curves, curve
    added = parse_codec_spec(reference)
    return [*curves, added], added


@dataclass
class BenchOptions:
    dataset: str
    specs: Sequence[str]
    reference: str = "avif"
    out: str = "bench-out"
    lpips_weights: str | None = None
    limit: int | None = None
    gallery: int = 3
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
    gallery, crop_images = choose_gallery(curve_results, reference_result, keys, images, boxes, crops, rows)
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
        raise FileNotFoundError(f"no loadable images under {options.dataset}")
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


def choose_gallery(curves, reference, keys, images, boxes, crops, rows) -> tuple[dict, dict[str, np.ndarray]]:
    """For each curve the point nearest the reference's median bpp; the crops to show, by file name."""
    target = statistics.median_low([p["bpp"] for p in reference["points"]])
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
    return {"target_bpp": target, "curves": picks, "images": entries}, files


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
