"""The codec interface: a batch of RGB images in, one self-describing bitstream per image out, and back.

    images (list of H×W×3 uint8, any sizes) ──encode_payloads──► payloads ──container.pack──► streams
    streams ──container.unpack──► (headers, payloads) ──decode_payloads──► images

A codec subclass declares its parameters and presets and implements the two payload methods; this base
class owns validation, the container and the checks that make a stream refuse the wrong decoder. The
decoder takes its parameters from each stream's header, not from how the codec object was built, so
one decoder serves an archive written with any mix of settings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from . import container
from .container import Header
from .errors import BitstreamError, ParameterError


@dataclass(frozen=True)
class Param:
    """One codec parameter, with the range a user may set it to."""

    name: str
    kind: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    # Where weights are found, not what a stream means: kept out of streams and specs (module docstring).
    location: bool = False

    def parse(self, value: Any) -> Any:
        """Turn a user's value (often a command-line string) into a checked value of this parameter."""
        try:
            parsed = self.kind(value)
        except (TypeError, ValueError):
            raise ParameterError(f"parameter {self.name!r} needs a {self.kind.__name__}, got {value!r}") from None
        if self.choices is not None and parsed not in self.choices:
            raise ParameterError(f"parameter {self.name!r} must be one of {list(self.choices)}, got {parsed!r}")
        if self.minimum is not None and parsed < self.minimum:
            raise ParameterError(f"parameter {self.name!r} must be >= {self.minimum}, got {parsed!r}")
        if self.maximum is not None and parsed > self.maximum:
            raise ParameterError(f"parameter {self.name!r} must be <= {self.maximum}, got {parsed!r}")
        return parsed


class Codec(ABC):
    name: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, device: str = "cpu", **params: Any):
        self.device = device
        self.config = self.resolve_params(params)

    @classmethod
    def resolve_params(cls, params: Mapping[str, Any], preset: str | None = None) -> dict[str, Any]:
        """Defaults, overlaid by the preset, overlaid by explicit params; every value checked."""
        known = {p.name: p for p in cls.params}
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ParameterError(f"codec {cls.name!r} has no parameter {unknown[0]!r}; it takes {sorted(known)}")
        values = {p.name: p.default for p in cls.params}
        if preset is not None:
            if preset not in cls.presets:
                raise ParameterError(f"codec {cls.name!r} has no preset {preset!r}; presets: {sorted(cls.presets)}")
            values.update(cls.presets[preset])
        values.update(params)
        return {name: known[name].parse(value) for name, value in values.items()}

    @classmethod
    def split_params(cls, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what a stream records, where the weights are): `params` split by the Param `location` flag."""
        locations = {p.name for p in cls.params if p.location}
        return (
            {k: v for k, v in params.items() if k not in locations},
            {k: v for k, v in params.items() if k in locations},
        )

    @classmethod
    def locations_in(cls, folder: str) -> dict[str, Any]:
        """Location params that load the weights from one folder laid out as `weights_folders` describes:
        the first location param names the folder, the others take their defaults (which look inside it)."""
        names = [p for p in cls.params if p.location]
        return {p.name: (folder if i == 0 else p.default) for i, p in enumerate(names)}

    @classmethod
    def base_decoder(cls, params: Mapping[str, Any], device: str = "cpu") -> "Codec":
        """A decoder of these streams that needs no model weights: the codec itself when it has none; a
        codec with a base layer (hfd) overrides this to decode that layer alone (`decode --base-only`)."""
        if any(p.location for p in cls.params):
            raise ParameterError(
                f"codec {cls.name!r} has no part that decodes without its model weights; --base-only applies to "
                "codecs with a base layer (hfd)"
            )
        return cls(device, **cls.split_params(params)[0])

    @property
    def stream_params(self) -> dict[str, Any]:
        """The parameters every stream records: all the decoder needs, but not where the weights are."""
        return self.split_params(self.config)[0]

    @property
    def locations(self) -> dict[str, Any]:
        return self.split_params(self.config)[1]

    def weights_folders(self) -> dict[str, Any]:
        """The local folders this codec's weights came from, by the sub-folder of one weights folder each
        belongs in ("" for its root): what `encode --embed-model` copies. None for a folder that is not
        local (a hub id). Codecs without weights have none."""
        return {}

    @property
    def fingerprint(self) -> bytes:
        """Content hash of the model weights this codec decodes with; empty for codecs without weights."""
        return b""

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        """Figures a codec reports about one of its streams beyond its size (the bench averages them)."""
        return {}

    def encode(self, images: Sequence[np.ndarray]) -> list[bytes]:
        for image in images:
            check_image(image)
        payloads = self.encode_payloads(list(images))
        return [
            container.pack(
                Header(self.name, self.stream_params, self.fingerprint, width=image.shape[1], height=image.shape[0]),
                payload,
            )
            for image, payload in zip(images, payloads, strict=True)
        ]

    def decode(self, streams: Sequence[bytes]) -> list[np.ndarray]:
        parsed = [self.read(stream) for stream in streams]
        images = self.decode_payloads([p for _, p in parsed], [h for h, _ in parsed])
        for (header, _), image in zip(parsed, images, strict=True):
            if image.shape != (header.height, header.width, 3) or image.dtype != np.uint8:
                raise BitstreamError(
                    f"{self.name} decoded a {image.shape} {image.dtype} image; the stream says "
                    f"{header.height}×{header.width}"
                )
        return images

    def read(self, stream: bytes) -> tuple[Header, bytes]:
        """Unpack a stream and refuse it unless this codec, with these weights, can decode it."""
        header, payload = container.unpack(stream)
        self.check_header(header, self.fingerprint)
        return header, payload

    @classmethod
    def check_header(cls, header: Header, fingerprint: bytes) -> None:
        """Refuse a stream's header unless this codec, holding weights with `fingerprint`, can decode it.
        A class method: checking an archive's streams needs no weights loaded."""
        if header.codec != cls.name:
            raise BitstreamError(f"stream was written by codec {header.codec!r}, not {cls.name!r}")
        if header.fingerprint != fingerprint:
            raise BitstreamError(
                f"stream needs model weights with fingerprint {header.fingerprint.hex() or '(none)'}; "
                f"these weights are {fingerprint.hex() or '(none)'}"
            )
        try:
            cls.resolve_params(header.params)
        except ValueError as exc:
            raise BitstreamError(f"stream carries parameters this codec cannot use: {exc}") from None

    @abstractmethod
    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        """One payload per image, in order."""

    @abstractmethod
    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        """One H×W×3 uint8 image per payload, decoded with the parameters in its header."""


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
        raise ValueError(f"codecs take H×W×3 uint8 RGB arrays, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: {image.shape}")
