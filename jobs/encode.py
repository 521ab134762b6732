"""`diffarc encode`."""

from __future__ import annotations

import sys

import click

from ..codecs.registry import DEFAULT_CODEC
from ..pipeline.images import DEFAULT_MAX_PIXELS
from .options import (
    EXIT_ITEMS_FAILED, Progress, actors_option, address_option, emit, json_option, parse_params, storage_option,
)


@click.command("encode")
@click.argument("src")
@click.argument("archive")
@click.option("--codec", default=DEFAULT_CODEC, show_default=True, help="Codec name (see `diffarc codecs`).")
@click.option("--preset", help="One of the codec's presets.")
@click.option("--param", "params", multiple=True, metavar="K=V", callback=parse_params,
              help="Codec parameter; repeatable.")
@click.option("--shard-size", type=click.IntRange(1), default=512, show_default=True,
              help="Most images per shard (shorter at the end of a job, so the actors finish together).")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Images per codec call.")
@click.option("--max-pixels", type=click.IntRange(1), default=DEFAULT_MAX_PIXELS, show_default=True)
@click.option("--retry-failed", is_flag=True, help="Re-run only the items in the failure table.")
@click.option("--embed-model", is_flag=True,
              help="Store the codec's weights in ARCHIVE/models/<fingerprint>/, so it decodes without them.")
@actors_option
@address_option
@storage_option
@json_option
def encode(src, archive, codec, preset, params, shard_size, batch_size, max_pixels, retry_failed, embed_model, actors,
           address, storage_options, as_json):
    """Encode the images under SRC (folder URL or list file of URLs) into ARCHIVE.

    Running it again resumes: items already committed are skipped.
    """
    from ..pipeline.preflight import check_source

    check_source(src, storage_options)  # a mistyped SRC answers before the codec, pyarrow or Ray is imported
    from ..pipeline.encode import EncodeOptions, run_encode

    options = EncodeOptions(
        codec=codec, params=params, preset=preset, shard_size=shard_size, batch_size=batch_size,
        actors=actors, max_pixels=max_pixels, retry_failed=retry_failed, embed_model=embed_model,
    )
    with Progress("encode") as progress:
        summary = run_encode(src, archive, options, storage_options, address, progress)
    totals = summary.totals
    document = {**summary.__dict__, "images_per_second": summary.images_per_second}
    emit(as_json, document, [
        f"encoded {summary.encoded} images ({summary.already_done} already in the archive, "
        f"{summary.failed} failed, {summary.refused} refused at listing, {summary.skipped_non_images} non-image "
        "files skipped) "
        f"in {summary.seconds:.1f} s, {summary.images_per_second:.2f} images/s",
        f"archive {archive}: {totals['items']} items, {totals['failed']} in the failure table, "
        f"{totals['source_bytes']:,} source bytes → {totals['archive_bytes']:,} bytes",
        *([f"{summary.deferred} images not fetched (their storage kept failing): run the same command again "
           "to encode them"] if summary.deferred else []),
    ])
    if totals["failed"] or summary.deferred:
        sys.exit(EXIT_ITEMS_FAILED)
