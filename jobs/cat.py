"""`diffarc cat`."""

from __future__ import annotations


import click

from .options import (
    decode_params_option, max_pixels_option, model_option, result_stream, storage_option, trust_hint_option,
)


@click.command("cat")
@click.argument("archive")
@click.argument("key")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--format", "image_format", default="png", show_default=True,
              type=click.Choice(["png", "jpeg", "webp", "tiff", "bmp"]))
@click.option("--stream", is_flag=True,
              help="Write KEY's standalone bitstream (codec, parameters, fingerprint; no archive needed) instead.")
@decode_params_option
@model_option
@trust_hint_option
@max_pixels_option
@storage_option
def cat(archive, key, output, image_format, stream, params, model, trust_hint, max_pixels, storage_options):
    """Decode the single image KEY from ARCHIVE, reading only the row group that holds it (a byte-exact item:
    its original file, whatever --format)."""
    from ..pipeline.decode import cat_item

    data = cat_item(archive, key, image_format, storage_options, model=model, stream=stream, max_pixels=max_pixels,
                    params=params, trust_hint=trust_hint)
    if output:
        with open(output, "wb") as handle:
            handle.write(data)
    else:
        result_stream().buffer.write(data)
