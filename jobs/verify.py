"""`diffarc verify`."""

from __future__ import annotations

import json
import sys

import click

from .options import EXIT_BELOW_THRESHOLD, EXIT_ITEMS_FAILED, Progress, decoding_options, emit


@click.command("verify")
@click.argument("archive")
@click.option("--against", help="Source to compare decoded images with: the folder URL or list file given to encode.")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Fraction of items to decode (and, with --against, compare), chosen by key hash: the same "
                   "every run. INTACT covers decoding for this sample only.")
@click.option("--lpips-weights", envvar="DIFFARC_LPIPS_WEIGHTS",
              help="LPIPS-squeeze safetensors file or folder (or DIFFARC_LPIPS_WEIGHTS); LPIPS skipped if absent, "
                   "unless --max-lpips asks for it.")
@click.option("--min-psnr", type=float, help="Fail when any compared item is below this PSNR (dB).")
@click.option("--min-ms-ssim", type=float, help="Fail when any compared item is below this MS-SSIM.")
@click.option("--max-lpips", type=float, help="Fail when any compared item is above this LPIPS.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write per-item results (JSON) here.")
@decoding_options
def verify(archive, against, sample, lpips_weights, min_psnr, min_ms_ssim, max_lpips, report_path, model, trust_hint,
           max_pixels, actors, address, storage_options, as_json):
    """Check ARCHIVE's integrity and, with --against, its quality against the originals."""
    # Thresholds judge what --against measures; without it (or without LPIPS weights) they would pass silently.
    given = [name for name, value in (("--min-psnr", min_psnr), ("--min-ms-ssim", min_ms_ssim),
                                      ("--max-lpips", max_lpips)) if value is not None]  # fmt: skip
    if given and not against:
        raise click.UsageError(f"{given[0]} compares decoded images with the originals: give them with --against SRC")
    if max_lpips is not None and not lpips_weights:
        raise click.UsageError(
            "--max-lpips needs the LPIPS-squeeze weights: pass --lpips-weights FILE or set DIFFARC_LPIPS_WEIGHTS"
        )
    from ..codecs.parts.metrics import find_lpips_weights
    from ..pipeline.archive import describe_holder
    from ..pipeline.verify import Thresholds, run_verify

    weights = None
    if against:
        weights = find_lpips_weights(lpips_weights)
        if weights is None:
            click.echo("notice: no LPIPS weights (--lpips-weights / DIFFARC_LPIPS_WEIGHTS); LPIPS skipped", err=True)
    with Progress("verify") as progress:
        report = run_verify(
            archive, against=against, fraction=sample,
            thresholds=Thresholds(min_psnr, min_ms_ssim, max_lpips), lpips_weights=str(weights) if weights else None,
            actors=actors, storage_options=storage_options, address=address, on_progress=progress, model=model,
            max_pixels=max_pixels, trust_hint=trust_hint,
        )
    summary = report.summary()
    if report_path:
        with open(report_path, "w") as handle:
            json.dump({"summary": summary, "items": report.quality}, handle, indent=1)

    def line(name, metric):
        s = summary[metric]
        return f"  {name}: mean {s['mean']:.4f}, min {s['min']:.4f}, max {s['max']:.4f} over {s['n']}" if s else None

    lines = [
        f"{'INTACT' if report.intact else 'NOT INTACT'}: {report.items} items in {report.shards} shards "
        f"({report.decoded} decoded), {len(report.problems)} archive problems, "
        f"{len(report.failures)} items that do not parse or decode",
        *([f"  being written by {describe_holder(report.writing)}: verified what it has committed so far"]
          if report.writing is not None else []),
        *[f"  problem: {p}" for p in report.problems],
        *[f"  failed {f.key}: [{f.stage}] {f.reason}" for f in report.failures],
    ]
    if against:
        lines.append(f"compared {len(report.quality)} items with {against}:")
        lines += [x for x in (line("PSNR dB", "psnr"), line("MS-SSIM", "ms_ssim"), line("LPIPS", "lpips")) if x]
        lines += [f"  below threshold {b['key']}: {'; '.join(b['violations'])}" for b in report.below_threshold]
    emit(as_json, summary, lines)
    if not report.intact:
        sys.exit(EXIT_ITEMS_FAILED)
    if report.below_threshold:
        sys.exit(EXIT_BELOW_THRESHOLD)
