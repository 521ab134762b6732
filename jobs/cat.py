"""`diffarc cat`."""

from __future__ import annotations

import sys

import click

from .options import storage_option


@click.command("cat")
@click.argument("archive")
@click.argument("key")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--format", "image_format", default="png", show_default=True,
              type=click.Choice(["png", "jpeg", "webp", "tiff", "bmp"]))
@storage_option
def cat(archive, key, output, image_format, storage_options):
    """Decode the single image KEY from ARCHIVE, reading only the row group that holds it."""
    from ..pipeline.decode import cat_item

    data = cat_item(archive, key, image_format, storage_options)
    if output:
        with open(output, "wb") as handle:
            handle.write(data)
    else:
        sys.stdout.buffer.write(data)
