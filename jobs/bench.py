"""`diffarc bench`: parse the arguments, then call `pipeline.bench.run_bench`."""

from __future__ import annotations

import json

import click

from ..pipeline.bench.specs import SPEC_HELP, SpecError, parse_codec_spec
from ..pipeline.images import DEFAULT_MAX_PIXELS
from .options import result_stream, storage_option


def _batch_sizes(ctx, param, value: str) -> list[int]:
    try:
        sizes = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, e.g. 1,4,8; got {value!r}") from None
    if not sizes or min(sizes) < 1:
        raise click.BadParameter(f"batch sizes must be integers >= 1, got {value!r}")
    return sizes


def _check_spec(spec: str) -> None:
    # Parse now, so a bad spec stops the command before any image is loaded.
    try:
        parse_codec_spec(spec)
    except SpecError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_specs(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    for spec in values:
        _check_spec(spec)
    return values


def _check_reference(ctx, param, value: str) -> str:
    _check_spec(value)
    return value


@click.command(
    "bench",
    help="Rate–distortion–perception curves and speed of codecs on the images under DATASET (any fsspec URL).\n\n"
    + "\b\n" + SPEC_HELP  # \b: click keeps the grammar's lines as they are
    + "\n\nBD-rates compare each curve with --reference on PSNR, MS-SSIM and LPIPS (taken on −LPIPS, since "
    "lower LPIPS is better); negative means fewer bits for the same quality. Writes results.json, "
    "results.csv, PNG plots, gallery crops and report.html under --out.",
)
@click.argument("dataset")
@click.option("--codec", "specs", multiple=True, required=True, callback=_check_specs,
              help="a curve to measure (repeatable); grammar above")
@click.option("--reference", default="avif", show_default=True, callback=_check_reference,
              help="curve that BD-rates are taken against: a --codec spec or codec name; added to the run if absent")
@click.option("--out", default="bench-out", show_default=True, help="output folder")
@click.option("--lpips-weights", default=None, help="LPIPS-squeeze safetensors file (default: $DIFFARC_LPIPS_WEIGHTS)")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="only the first N images")
@click.option("--gallery", type=click.IntRange(min=0), default=3, show_default=True, help="images in the crop gallery")
@click.option("--gallery-bpp", type=click.FloatRange(min=0, min_open=True), default=None,
              help="show each curve at its point nearest this bpp (default: the reference's median point)")
@click.option("--throughput", is_flag=True,
              help="also time encode/decode at several batch sizes (and an SD-2.1-sized UNet on a GPU)")
@click.option("--batch-sizes", default="1,4,8", show_default=True, callback=_batch_sizes, help="for --throughput")
@click.option("--json", "as_json", is_flag=True, help="print the summary as one JSON object instead of a table")
@storage_option
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True,
              help="skip images with more pixels than this (checked before decoding)")
def bench(
    dataset, specs, reference, out, lpips_weights, limit, gallery, gallery_bpp, throughput, batch_sizes, as_json, storage_options,
    max_pixels,
):
    # Imported here, not at the top: they load torch and matplotlib, which every other command can do without.
    from ..pipeline.bench.report import format_table
    from ..pipeline.bench.run import BenchOptions, run_bench, summary

    options = BenchOptions(
        dataset=dataset, specs=specs, reference=reference, out=out, lpips_weights=lpips_weights, limit=limit,
        gallery=gallery, gallery_bpp=gallery_bpp, throughput=throughput, batch_sizes=batch_sizes, storage_options=storage_options or {},
        max_pixels=max_pixels,
    )  # fmt: skip
    results = run_bench(options, log=lambda message: click.echo(message, err=True))
    if as_json:
        click.echo(json.dumps(summary(results), allow_nan=False), file=result_stream())
    else:
        click.echo(format_table(results), file=result_stream())
        click.echo(f"\nwrote {out}/report.html", file=result_stream())
