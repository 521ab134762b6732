"""`diffarc info`."""

from __future__ import annotations

import json

import click

from .options import emit, json_option, storage_option


@click.command("info")
@click.argument("archive")
@click.option("--price-per-gb-month", type=float, default=0.023, show_default=True,
              help="Storage price in $/GB-month (default: S3 Standard).")
@storage_option
@json_option
def info(archive, price_per_gb_month, storage_options, as_json):
    """Counts, sizes, compression ratio, bpp, codec, failures and storage cost saved."""
    from ..pipeline.info import archive_info
    from ..pipeline.archive import describe_holder

    facts = archive_info(archive, price_per_gb_month, storage_options)
    bpp = facts["bpp"]
    if facts["complete"]:
        state = "complete"
    elif facts["writing"]:
        state = f"INCOMPLETE: being written by {describe_holder(facts['writing'])}"
    else:
        state = "INCOMPLETE: its encode stopped before it finished; run it again to finish"
    emit(as_json, facts, [
        f"archive   {facts['archive']} ({state})",
        f"codec     {facts['codec']} {json.dumps(facts['params'], sort_keys=True)}",
        f"model     {facts['model_fingerprint'] or '(none)'}" + (" (embedded in the archive)" if facts["model_embedded"] else ""),
        f"items     {facts['items']} in {facts['shards']} shards; {facts['failed']} failed {facts['failures_by_stage'] or ''}",
        "kept      " + ", ".join(f"{count} {kind}" for kind, count in facts["fidelity"].items())
        + f"; {facts['colour_converted']} converted to sRGB from their colour profile",
        f"bytes     {facts['source_bytes']:,} source → {facts['archive_bytes']:,} archive"
        + (f"  (ratio {facts['ratio']:.2f}×)" if facts["ratio"] else ""),
        f"bpp       mean {bpp['mean']:.3f}, median {bpp['median']:.3f}, p5 {bpp['p5']:.3f}, p95 {bpp['p95']:.3f}"
        if bpp else "bpp       (no items)",
        f"cost      ${facts['cost_source_per_month']:.4g}/month as source → ${facts['cost_archive_per_month']:.4g}"
        f"/month archived: saves ${facts['saved_per_month']:.4g}/month at ${price_per_gb_month}/GB-month",
        *[f"problem   {p} (left out of the figures above; run diffarc verify)" for p in facts["problems"]],
    ])
