"""Codec names → codec classes. A new codec is one file in this package and one line here.

Classes are imported on first use so that listing codecs, or using a classical one, does not load
torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from .base import Codec
from .container import Header, unpack
from .errors import UnknownCodecError

_CODECS = {
    "jpeg": "diffarc.codecs.classical:JpegCodec",
    "webp": "diffarc.codecs.classical:WebpCodec",
    "avif": "diffarc.codecs.classical:AvifCodec",
    "ddcm": "diffarc.codecs.ddcm:DdcmCodec",
    "latent-denoise": "diffarc.codecs.latent_denoise.codec:LatentDenoiseCodec",
}

# The codec `encode` uses when none is named: the best one that runs anywhere without weights.
DEFAULT_CODEC = "avif"


def codec_names() -> list[str]:
    return sorted(_CODECS)


def codec_class(name: str) -> type[Codec]:
    if name not in _CODECS:
        raise UnknownCodecError(f"unknown codec {name!r}; available: {', '.join(codec_names())}")
    module, attribute = _CODECS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def create_codec(
    name: str, params: Mapping[str, Any] | None = None, preset: str | None = None, device: str = "cpu"
) -> Codec:
    cls = codec_class(name)
    return cls(device=device, **cls.resolve_params(params or {}, preset))


def codec_for_header(header: Header, device: str = "cpu") -> Codec:
    """The codec that decodes a stream with this header."""
    return create_codec(header.codec, header.params, device=device)


def read_header(stream: bytes) -> Header:
    return unpack(stream)[0]
