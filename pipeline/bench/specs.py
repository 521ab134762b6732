"""The `--codec` spec grammar of the bench: a spec is one curve, each of its points a codec with parameters."""

from __future__ import annotations

import re

import numpy as np
from dataclasses import dataclass
from typing import Any

from ...codecs.base import Codec, Param
from ...codecs.registry import codec_class

SPEC_HELP = """\
Each --codec is one curve:
  NAME              every preset (one point, the defaults, if none)
  NAME:PRESET       one point
  NAME:K=V,K=V      one point; a preset may come first: NAME:high,K=V
  NAME:K=A..B/N     N points from A to B inclusive, evenly spaced
                    (rounded for integer parameters)
  NAME:K=A|B|C      one point per listed value
One parameter per spec may sweep; the other items are fixed,
e.g. webp:method=6,quality=5..60/4"""



class SpecError(ValueError):
    """A --codec or --reference spec that cannot be run; the message names the spec and the problem."""


@dataclass(frozen=True)
class Point:
    codec: str
    label: str  # what the user asked for at this point, e.g. "quality=30" or "high"
    params: dict[str, Any]  # every parameter, resolved


@dataclass(frozen=True)
class Curve:
    name: str  # the spec as given: unique within a run, used in legends and tables
    codec: str
    points: tuple[Point, ...]


def parse_codec_spec(spec: str) -> Curve:
    """One --codec spec (grammar in SPEC_HELP) → a curve of points with checked parameters."""
    spec = spec.strip()
    name, colon, rest = spec.partition(":")
    try:
        cls = codec_class(name)
    except ValueError as exc:
        raise SpecError(f"--codec {spec!r}: {exc}") from None
    if not colon:
        if not cls.presets:
            return Curve(spec, name, (Point(name, "defaults", cls.resolve_params({})),))
        return Curve(spec, name, tuple(Point(name, p, cls.resolve_params({}, p)) for p in cls.presets))
    try:
        preset, fixed, sweep = _parse_items(cls, rest)
        if sweep is None:
            settings = [(_label(preset, fixed), fixed)]
        else:
            key, values = sweep
            settings = [(_label(preset, {**fixed, key: v}), {**fixed, key: v}) for v in values]
        points = tuple(Point(name, label, cls.resolve_params(params, preset)) for label, params in settings)
    except ValueError as exc:
        raise SpecError(f"--codec {spec!r}: {exc}") from None
    return Curve(spec, name, points)


def _parse_items(cls: type[Codec], text: str):
    known = {p.name: p for p in cls.params}
    preset, fixed, sweep = None, {}, None
    for item in (i.strip() for i in text.split(",")):
        if not item:
            raise ValueError("empty item; expected PRESET or K=V items separated by commas")
        key, equals, value = (s.strip() for s in item.partition("="))
        if not equals:
            if preset is not None:
                raise ValueError(f"two presets ({preset!r}, {item!r}); give at most one")
            preset = item
            continue
        if key not in known:
            raise ValueError(f"codec {cls.name!r} has no parameter {key!r}; it takes {sorted(known)}")
        if ".." in value or "|" in value:
            if sweep is not None:
                raise ValueError(f"sweeps both {sweep[0]!r} and {key!r}; a curve sweeps one parameter")
            sweep = (key, _sweep_values(known[key], value))
        else:
            fixed[key] = known[key].parse(value)
    return preset, fixed, sweep


_RANGE = re.compile(r"^(?P<start>[-+]?[\d.]+)\.\.(?P<stop>[-+]?[\d.]+)/(?P<count>\d+)$")


def _sweep_values(param: Param, text: str) -> list:
    if "|" in text:
        items = [v.strip() for v in text.split("|")]
        if any(not v for v in items):
            raise ValueError(f"malformed list {text!r} for {param.name!r}: expected A|B|C")
        values = [param.parse(v) for v in items]
    else:
        match = _RANGE.match(text.replace(" ", ""))
        if not match:
            raise ValueError(f"malformed range {text!r} for {param.name!r}: expected START..STOP/COUNT, e.g. 10..90/5")
        if param.kind not in (int, float):
            raise ValueError(f"a range needs a numeric parameter; {param.name!r} is a {param.kind.__name__}")
        try:
            start, stop = float(match["start"]), float(match["stop"])
        except ValueError:
            raise ValueError(f"malformed range {text!r} for {param.name!r}: START and STOP must be numbers") from None
        count = int(match["count"])
        if count < 2 or start == stop:
            raise ValueError(f"range {text!r} for {param.name!r} needs START != STOP and COUNT >= 2")
        spaced = np.linspace(start, stop, count)
        values = [param.parse(round(v) if param.kind is int else float(v)) for v in spaced]
    if len(set(values)) != len(values):
        raise ValueError(f"{param.name}={text} gives repeated values {values}")
    return values


def _label(preset: str | None, params: dict[str, Any]) -> str:
    parts = ([preset] if preset else []) + [f"{k}={v}" for k, v in params.items()]
    return ",".join(parts) or "defaults"


def resolve_reference(curves: list[Curve], reference: str) -> tuple[list[Curve], Curve]:
    """The reference curve among `curves` (by spec, else by codec), or parsed from `reference` and added."""
    for match in (lambda c: c.name == reference, lambda c: c.codec == reference):
        for curve in curves:
            if match(curve):
                return curves, curve
    added = parse_codec_spec(reference)
    return [*curves, added], added
