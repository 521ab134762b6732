"""`diffarc models`: list the built-in models."""

from __future__ import annotations

import json

import click

from .options import result_stream


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def models(as_json):
    """List the built-in models: name, parameters, size on disk, fingerprint."""
    from ..codecs.parts.models import builtin_models
    from ..codecs.registry import builtin_codec_weights

    rows = builtin_models() + builtin_codec_weights()
    if as_json:
        click.echo(json.dumps({"models": rows}), file=result_stream())
        return
    if not rows:
        click.echo("no built-in models shipped", file=result_stream())
    for row in rows:
        click.echo(
            f"{row['name']:<20} {row['parameters'] / 1e6:6.2f} M params  {row['bytes'] / 1e6:6.2f} MB  "
            f"{'+'.join(row['components']):<9} {row['fingerprint']}", file=result_stream(),
        )
