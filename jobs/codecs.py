"""`diffarc codecs`."""

from __future__ import annotations

import click

from ..codecs.registry import DEFAULT_CODEC, codec_class, codec_names
from .options import emit, json_option


@click.command("codecs")
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
