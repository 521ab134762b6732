"""`diffarc`: the one command users call. Each subcommand parses its arguments and calls the pipeline.

Exit codes (all commands):
  0  everything succeeded
  1  the job could not run (no such source or archive, incompatible archive, unexpected error)
  2  bad usage (unknown option, malformed value)
  3  the job completed, but some items failed (they are listed in the summary / failure table)
  4  verify only: the archive is intact but some items are below a quality threshold
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..codecs.registry import DEFAULT_CODEC, codec_class, codec_names
from ..pipeline.images import DEFAULT_MAX_PIXELS
from .bench import bench
from .train import models, train

EXIT_ITEMS_FAILED = 3
EXIT_BELOW_THRESHOLD = 4


def parse_params(values: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for value in values:
        name, sep, setting = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"expected k=v, got {value!r}", param_hint="--param")
        params[name.strip()] = setting.strip()
    return params


def parse_storage_options(value: str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        options = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--storage-options") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--storage-options")
    return options


class Progress:
    """A one-line counter on stderr, shown only when stderr is a terminal."""

    def __init__(self, label: str):
        self.label = label
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int | None, failed: int) -> None:
        if self.enabled:
            of = f"/{total}" if total is not None else ""
            click.echo(f"\r{self.label}: {done}{of} done, {failed} failed", err=True, nl=False)

    def close(self) -> None:
        if self.enabled:
            click.echo(err=True)


def emit(as_json: bool, document: dict, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(document, default=str))
    else:
        for line in lines:
            click.echo(line)


def run_job(function, *args, **kwargs):
    """Run a pipeline call, turning the errors a user can act on into one clear line (exit code 1)."""
    from ..pipeline.archive import ArchiveError

    try:
        return function(*args, **kwargs)
    except (ArchiveError, FileNotFoundError, ValueError, KeyError, PermissionError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise click.ClickException(f"{type(exc).__name__}: {message}") from None


storage_option = click.option(
    "--storage-options", help="JSON object passed to fsspec (e.g. S3 endpoint/credentials); AWS_* env vars also work."
)
address_option = click.option("--address", envvar="RAY_ADDRESS", help="Ray cluster to join; default: a local one.")
actors_option = click.option("--actors", type=int, help="Codec actors; default one per GPU, else one per CPU.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="diffarc")
def main() -> None:
    """Recompress image archives with diffusion codecs on Ray, and get them back."""


@main.command()
@click.argument("src")
@click.argument("archive")
@click.option("--codec", default=DEFAULT_CODEC, show_default=True, help="Codec name (see `diffarc codecs`).")
@click.option("--preset", help="One of the codec's presets.")
@click.option("--param", "params", multiple=True, metavar="K=V", help="Codec parameter; repeatable.")
@click.option("--shard-size", type=click.IntRange(1), default=512, show_default=True,
              help="Most images per shard (a small job is split evenly across actors).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Images per codec call.")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True)
@click.option("--retry-failed", is_flag=True, help="Re-run only the items in the failure table.")
@actors_option
@address_option
@storage_option
@json_option
def encode(src, archive, codec, preset, params, shard_size, batch_size, max_pixels, retry_failed, actors, address,
           storage_options, as_json):
    """Encode the images under SRC (folder URL or list file of URLs) into ARCHIVE.

    Running it again resumes: items already committed are skipped.
    """
    from ..pipeline.encode import EncodeOptions, run_encode

    options = EncodeOptions(
        codec=codec, params=parse_params(params), preset=preset, shard_size=shard_size, batch_size=batch_size,
        actors=actors, max_pixels=max_pixels, retry_failed=retry_failed,
    )
    progress = Progress("encode")
    summary = run_job(run_encode, src, archive, options, parse_storage_options(storage_options), address, progress)
    progress.close()
    totals = summary.totals
    document = {**summary.__dict__, "images_per_second": summary.images_per_second}
    emit(as_json, document, [
        f"encoded {summary.encoded} images ({summary.already_done} already in the archive, "
        f"{summary.failed} failed, {summary.skipped_non_images} non-image files skipped) "
        f"in {summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s",
        f"archive {archive}: {totals['items']} items, {totals['failed']} in the failure table, "
        f"{totals['source_bytes']:,} source bytes → {totals['archive_bytes']:,} bytes",
    ])
    if totals["failed"]:
        sys.exit(EXIT_ITEMS_FAILED)


@main.command()
@click.argument("archive")
@click.argument("dst")
@click.option("--prefix", default="", help="Only keys starting with this.")
@click.option("--keys", "keys_file", type=click.File("r"), help="Only the keys listed in this file, one per line.")
@click.option("--format", "image_format", default="png", show_default=True,
              type=click.Choice(["png", "jpeg", "webp", "tiff", "bmp"]))
@click.option("--overwrite", is_flag=True, help="Decode again even where the output file exists.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@actors_option
@address_option
@storage_option
@json_option
def decode(archive, dst, prefix, keys_file, image_format, overwrite, batch_size, actors, address, storage_options,
           as_json):
    """Decode ARCHIVE (all, or a subset) to image files under DST, keys as relative paths."""
    from ..pipeline.decode import run_decode

    keys = [line.strip() for line in keys_file if line.strip()] if keys_file else None
    progress = Progress("decode")
    summary = run_job(
        run_decode, archive, dst, keys=keys, prefix=prefix, image_format=image_format, overwrite=overwrite,
        actors=actors, batch_size=batch_size, storage_options=parse_storage_options(storage_options),
        address=address, on_progress=progress,
    )
    progress.close()
    document = {**summary.__dict__, "failures": [f.__dict__ for f in summary.failures],
                "images_per_second": summary.images_per_second}
    emit(as_json, document, [
        f"decoded {summary.decoded} images ({summary.skipped_existing} already there, "
        f"{len(summary.failures)} failed) in {summary.seconds:.1f} s",
        *[f"  failed {f.key}: [{f.stage}] {f.reason}" for f in summary.failures],
    ])
    if summary.failures:
        sys.exit(EXIT_ITEMS_FAILED)


@main.command()
@click.argument("archive")
@click.option("--against", help="Source folder URL to compare decoded images with.")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
              help="Fraction of items to decode and compare (chosen by key hash: the same every run).")
@click.option("--lpips-weights", envvar="DIFFARC_LPIPS_WEIGHTS",
              help="LPIPS-squeeze safetensors file or folder (or DIFFARC_LPIPS_WEIGHTS); LPIPS skipped if absent.")
@click.option("--min-psnr", type=float, help="Fail when any compared item is below this PSNR (dB).")
@click.option("--min-ms-ssim", type=float, help="Fail when any compared item is below this MS-SSIM.")
@click.option("--max-lpips", type=float, help="Fail when any compared item is above this LPIPS.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write per-item results (JSON) here.")
@actors_option
@address_option
@storage_option
@json_option
def verify(archive, against, sample, lpips_weights, min_psnr, min_ms_ssim, max_lpips, report_path, actors, address,
           storage_options, as_json):
    """Check ARCHIVE's integrity and, with --against, its quality against the originals."""
    from ..codecs.metrics import find_lpips_weights
    from ..pipeline.verify import Thresholds, run_verify

    weights = None
    if against:
        weights = run_job(find_lpips_weights, lpips_weights)
        if weights is None:
            click.echo("notice: no LPIPS weights (--lpips-weights / DIFFARC_LPIPS_WEIGHTS); LPIPS skipped", err=True)
    progress = Progress("verify shards")
    report = run_job(
        run_verify, archive, against=against, fraction=sample,
        thresholds=Thresholds(min_psnr, min_ms_ssim, max_lpips), lpips_weights=str(weights) if weights else None,
        actors=actors, storage_options=parse_storage_options(storage_options), address=address, on_progress=progress,
    )
    progress.close()
    summary = report.summary()
    if report_path:
        with open(report_path, "w") as handle:
            json.dump({"summary": summary, "items": report.quality}, handle, indent=1)

    def line(name, metric):
        s = summary[metric]
        return f"  {name}: mean {s['mean']:.4f}, min {s['min']:.4f}, max {s['max']:.4f} over {s['n']}" if s else None

    lines = [
        f"{'INTACT' if report.intact else 'NOT INTACT'}: {report.items} items in {report.shards} shards, "
        f"{len(report.problems)} archive problems, {len(report.failures)} items that do not parse or decode",
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


@main.command()
@click.argument("archive")
@click.option("--price-per-gb-month", type=float, default=0.023, show_default=True,
              help="Storage price in $/GB-month (default: S3 Standard).")
@storage_option
@json_option
def info(archive, price_per_gb_month, storage_options, as_json):
    """Counts, sizes, compression ratio, bpp, codec, failures and storage cost saved."""
    from ..pipeline.info import archive_info

    facts = run_job(archive_info, archive, price_per_gb_month, parse_storage_options(storage_options))
    bpp = facts["bpp"]
    emit(as_json, facts, [
        f"archive   {facts['archive']} ({'complete' if facts['complete'] else 'INCOMPLETE: encode still running or killed'})",
        f"codec     {facts['codec']} {json.dumps(facts['params'], sort_keys=True)}",
        f"model     {facts['model_fingerprint'] or '(none)'}",
        f"items     {facts['items']} in {facts['shards']} shards; {facts['failed']} failed {facts['failures_by_stage'] or ''}",
        f"bytes     {facts['source_bytes']:,} source → {facts['archive_bytes']:,} archive"
        + (f"  (ratio {facts['ratio']:.2f}×)" if facts["ratio"] else ""),
        f"bpp       mean {bpp['mean']:.3f}, median {bpp['median']:.3f}, p5 {bpp['p5']:.3f}, p95 {bpp['p95']:.3f}"
        if bpp else "bpp       (no items)",
        f"cost      ${facts['cost_source_per_month']:.4g}/month as source → ${facts['cost_archive_per_month']:.4g}"
        f"/month archived: saves ${facts['saved_per_month']:.4g}/month at ${price_per_gb_month}/GB-month",
    ])


@main.command()
@click.argument("archive")
@click.argument("key")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--format", "image_format", default="png", show_default=True,
              type=click.Choice(["png", "jpeg", "webp", "tiff", "bmp"]))
@storage_option
def cat(archive, key, output, image_format, storage_options):
    """Decode the single image KEY from ARCHIVE, reading only the row group that holds it."""
    from ..pipeline.decode import cat_item

    data = run_job(cat_item, archive, key, image_format, parse_storage_options(storage_options))
    if output:
        with open(output, "wb") as handle:
            handle.write(data)
    else:
        sys.stdout.buffer.write(data)


@main.command("codecs")
@json_option
def list_codecs(as_json):
    """List codecs, their parameters and presets."""
    described = []
    for name in codec_names():
        cls = codec_class(name)
        described.append({
            "name": name,
            "description": cls.description,
            "default": name == DEFAULT_CODEC,
            "params": [
                {"name": p.name, "type": p.kind.__name__, "default": p.default, "help": p.help,
                 "min": p.minimum, "max": p.maximum, "choices": list(p.choices) if p.choices else None}
                for p in cls.params
            ],
            "presets": cls.presets,
        })
    lines = []
    for c in described:
        lines.append(f"{c['name']}{' (default)' if c['default'] else ''}: {c['description']}")
        for p in c["params"]:
            bounds = f" one of {p['choices']}" if p["choices"] else (
                f" [{p['min']}..{p['max']}]" if p["min"] is not None else "")
            lines.append(f"    {p['name']}={p['default']} ({p['type']}{bounds}): {p['help']}")
        if c["presets"]:
            lines.append("    presets: " + ", ".join(f"{k} {v}" for k, v in c["presets"].items()))
    emit(as_json, {"codecs": described}, lines)


for command in (bench, train, models):
    main.add_command(command)

if __name__ == "__main__":
    main()
