"""What a bench run writes and shows: results.json, results.csv, the PNG plots, the gallery crops,
report.html, and the table printed to stdout.

Everything here reads the results dict that `bench.run_bench` builds (the content of results.json), so
a report can be redrawn from a results.json alone, apart from the crops' pixels. Plots use matplotlib's
Agg backend (no display needed). report.html refers to the plots and crops by relative paths, so the
output folder can be copied or served as a whole.
"""

from __future__ import annotations

import csv
import html
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ..storage import Location  # noqa: E402

# (results key, axis label, file name); LPIPS is a distance: lower is better.
RATE_PLOTS = (
    ("psnr", "PSNR (dB, higher is better)", "bpp_psnr.png"),
    ("ms_ssim", "MS-SSIM (higher is better)", "bpp_ms_ssim.png"),
    ("lpips", "LPIPS-squeeze (lower is better)", "bpp_lpips.png"),
)
SPEED_PLOT = "speed.png"
CSV_COLUMNS = ("curve", "codec", "label", "params", "images", "bpp", "psnr", "ms_ssim", "lpips",
               "encode_s_per_image", "decode_s_per_image")  # fmt: skip


def write_outputs(out: Location, results: dict, crop_images: dict[str, np.ndarray]) -> None:
    """results.json, results.csv (one row per point), the plots, the gallery crops (file name → pixels)
    and report.html, under `out`. `results` must already be plain JSON (no inf or NaN)."""
    out.write_atomic("results.json", json.dumps(results, indent=1, allow_nan=False).encode())
    out.write_atomic("results.csv", points_csv(results).encode())
    for metric, label, name in RATE_PLOTS:
        out.write_atomic(name, plot_rate_curves(results, metric, label))
    out.write_atomic(SPEED_PLOT, plot_speed(results))
    for name, pixels in crop_images.items():
        out.write_atomic(name, png_bytes(pixels))
    out.write_atomic("report.html", render_html(results).encode())


def points_csv(results: dict) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for curve in results["curves"]:
        for point in curve["points"]:
            row = {**point, "params": json.dumps(point["params"], sort_keys=True)}
            writer.writerow(["" if row[c] is None else row[c] for c in CSV_COLUMNS])
    return text.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _line_style(curve: dict, results: dict) -> str:
    return "--" if curve["name"] == results["reference"] else "-"


def plot_rate_curves(results: dict, metric: str, label: str) -> bytes:
    """One line per curve, mean bpp against the mean metric; the reference curve dashed."""
    figure, axes = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for curve in results["curves"]:
        points = [p for p in curve["points"] if p[metric] is not None]
        if not points:
            continue
        axes.plot([p["bpp"] for p in points], [p[metric] for p in points], _line_style(curve, results), marker="o",
                  label=curve["name"])  # fmt: skip
        drawn = True
    if not drawn:
        axes.text(0.5, 0.5, f"{metric.upper()} was not measured", ha="center", va="center", transform=axes.transAxes)
    else:
        axes.legend(fontsize="small")
    # A log rate axis: codecs here span 0.02 to 1 bpp, and the low-rate end is where they differ.
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(ticker.NullFormatter())
    axes.set_xlabel("bits per pixel (whole stream, header included; log scale)")
    axes.set_ylabel(label)
    axes.set_title(f"{label.split(' (')[0]} vs rate, mean over {results['images']} images")
    axes.grid(True, alpha=0.3)
    return _figure_bytes(figure)


def plot_speed(results: dict) -> bytes:
    """Encode and decode images/s of every point (one image at a time), against its bpp."""
    figure, panes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for pane, step in zip(panes, ("encode", "decode")):
        for curve in results["curves"]:
            points = [p for p in curve["points"] if p[f"{step}_images_per_s"]]
            speeds = [p[f"{step}_images_per_s"] for p in points]
            pane.plot([p["bpp"] for p in points], speeds, _line_style(curve, results), marker="o", label=curve["name"])
        pane.set_yscale("log")
        # Ticks at 1, 2, 5 × 10^k written as plain numbers: "200" reads faster than "2×10²".
        pane.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        pane.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        pane.yaxis.set_minor_formatter(ticker.NullFormatter())
        pane.set_xlabel("bits per pixel")
        pane.set_title(f"{step}, images/s (batch 1, {results['run']['device']})")
        pane.grid(True, which="both", alpha=0.3)
    panes[0].set_ylabel("images per second")
    panes[0].legend(fontsize="small")
    return _figure_bytes(figure)


def _number(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _megabytes(value) -> str:
    return "–" if value is None else f"{value / 2**20:.0f}"


def points_table(results: dict, with_params: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-point means, formatted; the stdout table and the HTML share it."""
    header = ["curve", "point", *(["params"] if with_params else []), "bpp", "PSNR dB", "MS-SSIM", "LPIPS",
              "encode s/img", "decode s/img"]  # fmt: skip
    rows = [
        [c["name"], p["label"], *([json.dumps(p["params"], sort_keys=True)] if with_params else []),
         _number(p["bpp"], 3), _number(p["psnr"], 2), _number(p["ms_ssim"], 4), _number(p["lpips"], 4),
         _number(p["encode_s_per_image"], 4), _number(p["decode_s_per_image"], 4)]
        for c in results["curves"] for p in c["points"]
    ]  # fmt: skip
    return header, rows


def bd_rate_table(results: dict) -> tuple[list[str], list[list[str]]]:
    rows = [[name, _number(v["psnr"], 2), _number(v["ms_ssim"], 2), _number(v["lpips"], 2), v["interpolation"]]
            for name, v in results["bd_rate"].items()]  # fmt: skip
    return ["curve", "PSNR", "MS-SSIM", "LPIPS", "interpolation"], rows


def _text_table(header: list[str], rows: list[list[str]], text_columns: int) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) if i < text_columns else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]


def stream_stats_lines(results: dict) -> list[str]:
    """Per point, the means of what its codec reports about its streams (e.g. latent-denoise's t)."""
    return [
        f"{c['name']} [{p['label']}]: " + ", ".join(f"{k} {v:.4g}" for k, v in p["stream_stats"].items())
        for c in results["curves"] for p in c["points"] if p.get("stream_stats")
    ]  # fmt: skip


def format_table(results: dict) -> str:
    """The readable summary printed to stdout: every point, the codecs' own stream figures, the BD-rates."""
    stats = stream_stats_lines(results)
    return "\n".join([
        *_text_table(*points_table(results), text_columns=2),
        *(["", "Stream figures reported by the codecs (means over images)", *stats] if stats else []),
        "",
        f"BD-rate % against {results['reference']} (negative: fewer bits for the same quality)",
        *_text_table(*bd_rate_table(results), text_columns=1),
    ])  # fmt: skip


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th:first-child, td:first-child, td.text { text-align: left; }
.plots img { width: 48%; min-width: 420px; }
.gallery figure { display: inline-block; margin: 4px; vertical-align: top; }
.gallery img { image-rendering: pixelated; width: 256px; }
figcaption { font-size: 12px; max-width: 256px; }
"""


def _html_table(header: list[str], rows: list[list[str]], text_columns: int) -> str:
    def cells(row: list[str], tag: str) -> str:
        return "".join(
            f"<{tag}{' class=text' if i < text_columns else ''}>{html.escape(c)}</{tag}>" for i, c in enumerate(row)
        )

    body = "".join(f"<tr>{cells(row, 'td')}</tr>" for row in rows)
    return f"<table><tr>{cells(header, 'th')}</tr>{body}</table>"


def render_html(results: dict) -> str:
    e = html.escape
    run = results["run"]
    gpu = f", {e(run['gpu'])}" if run["gpu"] else ""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>diffarc bench</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>diffarc bench: {e(results['dataset'])}</h1>",
        f"<p>{results['images']} images; {e(run['date'])} on {e(run['host'])} ({e(run['device'])}{gpu}, "
        f"{run['torch_threads']} torch threads); {run['seconds']} s. Skipped files: {len(results['skipped'])}.</p>",
        "<h2>Points (means over images)</h2>",
        _html_table(*points_table(results, with_params=True), text_columns=3),
        f"<h2>BD-rate against {e(results['reference'])} (%)</h2>",
        "<p>Negative: the curve needs fewer bits than the reference for the same quality. LPIPS is a distance "
        "(lower is better), so its BD-rate is taken on −LPIPS. Cubic fits need ≥ 4 points on both curves; "
        "otherwise piecewise-linear interpolation. Empty: the curves do not overlap in that metric.</p>",
        _html_table(*bd_rate_table(results), text_columns=1),
        "<h2>Plots</h2><div class=plots>",
        *(f"<img src='{name}' alt='{e(label)}'>" for _, label, name in RATE_PLOTS),
        f"<img src='{SPEED_PLOT}' alt='speed'></div>",
    ]
    if results["throughput"]:
        parts.append(_throughput_html(results["throughput"]))
    if results["gallery"]["images"]:
        parts.append(_gallery_html(results["gallery"]))
    parts.append("</body></html>")
    return "\n".join(parts)


def _throughput_html(throughput: dict) -> str:
    header = ["curve", "point", "batch", "encode img/s", "encode peak MiB", "decode img/s", "decode peak MiB"]
    rows = [
        [t["curve"], t["label"], str(t["batch_size"]),
         _number(t["encode_images_per_s"], 2), _megabytes(t["encode_peak_memory_bytes"]),
         _number(t["decode_images_per_s"], 2), _megabytes(t["decode_peak_memory_bytes"])]
        for t in throughput["codecs"]
    ]  # fmt: skip
    height, width = throughput["image_size"]
    parts = [
        f"<h2>Throughput ({html.escape(throughput['device'])})</h2>",
        f"<p>Batches of the first image ({width}×{height}) repeated; memory: {html.escape(throughput['memory'])}.</p>",
        _html_table(header, rows, text_columns=2),
    ]
    unet = throughput["sd21_unet"]
    if "skipped" in unet:
        parts.append(f"<p>SD-2.1 UNet timing skipped: {html.escape(unet['skipped'])}.</p>")
    else:
        rows = [[str(r["batch_size"]), _number(r["forward_passes_per_s"], 2), _number(r["latents_per_s"], 2),
                 _megabytes(r["peak_memory_bytes"])] for r in unet["results"]]  # fmt: skip
        header = ["batch", "forward passes/s", "latents/s", "peak MiB"]
        parts += [f"<p>{html.escape(unet['config'])}; {unet['parameters'] / 1e6:.0f} M parameters.</p>",
                  _html_table(header, rows, text_columns=0)]  # fmt: skip
    return "\n".join(parts)


def _gallery_html(gallery: dict) -> str:
    e = html.escape
    parts = [
        "<h2>Gallery</h2>",
        f"<p>Centre crops; each curve at its point nearest {gallery['target_bpp']:.3f} bpp ({gallery['target']}). "
        "bpp, PSNR and LPIPS are the whole image's.</p><div class=gallery>",
    ]
    for image in gallery["images"]:
        parts.append(f"<h3>{e(image['key'])}</h3>")
        parts.append(f"<figure><img src='{e(image['original'])}'><figcaption>original</figcaption></figure>")
        for c in image["crops"]:
            caption = (f"{e(c['curve'])} [{e(c['label'])}]<br>{_number(c['bpp'], 3)} bpp, "
                       f"{_number(c['psnr'], 2)} dB, LPIPS {_number(c['lpips'], 3)}")  # fmt: skip
            parts.append(f"<figure><img src='{e(c['file'])}'><figcaption>{caption}</figcaption></figure>")
    parts.append("</div>")
    return "\n".join(parts)
