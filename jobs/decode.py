"""`diffarc decode`."""

from __future__ import annotations

import sys

import click

from .options import (
    EXIT_ITEMS_FAILED, Progress, decode_params_option, decoding_options, emit,
)


@click.command("decode")
@click.argument("archive")
@click.argument("dst")
@click.option("--prefix", default="", help="Only keys starting with this.")
@click.option("--keys", "keys_file", type=click.File("r"), help="Only the keys listed in this file, one per line.")
@click.option("--format", "image_format", default="png", show_default=True,
              type=click.Choice(["png", "jpeg", "webp", "tiff", "bmp"]))
@click.option("--overwrite", is_flag=True, help="Decode again even where the output file exists.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--base-only", is_flag=True,
              help="Decode only the base layer (hfd: the AVIF picture), with no model weights at all.")
@decode_params_option
@decoding_options
def decode(archive, dst, prefix, keys_file, image_format, overwrite, batch_size, base_only, params, model, trust_hint,
           max_pixels, actors, address, storage_options, as_json):
    """Decode ARCHIVE (all, or a subset) to image files under DST, keys as relative paths; a byte-exact item
    (jxl lossless=1 of a JPEG) is its original file, under its own key, whatever --format."""
    from ..pipeline.decode import run_decode

    keys = [line.strip() for line in keys_file if line.strip()] if keys_file else None
    with Progress("decode") as progress:
        summary = run_decode(
            archive, dst, keys=keys, prefix=prefix, image_format=image_format, overwrite=overwrite,
            actors=actors, batch_size=batch_size, storage_options=storage_options,
            address=address, on_progress=progress, model=model, max_pixels=max_pixels, base_only=base_only,
            params=params, trust_hint=trust_hint,
        )
    document = {**summary.__dict__, "failures": [f.__dict__ for f in summary.failures],
                "images_per_second": summary.images_per_second}
    emit(as_json, document, [
        f"decoded {summary.decoded} images ({summary.skipped_existing} already there, "
        f"{len(summary.failures)} failed, {len(summary.problems)} shards unreadable) in {summary.seconds:.1f} s",
        *[f"  problem: {p}" for p in summary.problems],
        *[f"  failed {f.key}: [{f.stage}] {f.reason}" for f in summary.failures],
    ])
    if summary.failures or summary.problems:
        sys.exit(EXIT_ITEMS_FAILED)
