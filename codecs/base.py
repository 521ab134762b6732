"""The codec interface: a batch of RGB images in, one self-describing bitstream per image out, and back.

    images (list of H×W×3 uint8, any sizes) ──encode_payloads──► payloads ──container.pack──► streams
    streams ──container.unpack──► (headers, payloads) ──check_header, check_cost──► decode_payloads ──► images

A codec subclass declares its parameters and presets and implements the two payload methods; this base
class owns validation, the container and the checks that make a stream refuse the wrong decoder. The
decoder takes its parameters from each stream's header, not from how the codec object was built, so
one decoder serves an archive written with any mix of settings (except `build_time` parameters, such as
the arithmetic the weights were cast to).

Streams may come from a hostile archive, so nothing in a header is trusted before it is bounded:
`check_cost` runs on every stream before any decoding work, from its header and payload length alone.
It refuses a stream unless
- it declares at least 1×1 and at most `max_pixels` pixels (the caller's limit: an archive's, or --max-pixels);
- the pixels its decoder works on, padding included, are at most MAX_PADDING × `max_pixels` (memory);
- its work, pixels × passes (network evaluations; a classical decoder makes one pass), each pass counted
  as at least MIN_PASS_PIXELS, is at most MAX_PASSES × `max_pixels` (time);
- and the codec's own `decode_cost` finds the payload consistent with the header (ddcm: its exact length;
  latent-denoise: its side information and symbol count). A codec overrides `decode_cost` to say its
  pixels and passes and to refuse what cannot be decoded, with cheap arithmetic and no decoding;
- and, for a decoder that runs networks (a codec with weights), its work is also at most FREE_WORK, or
  WORK_PER_BYTE per byte of its payload: a header costs nothing to write, so a 200-byte stream must not
  buy a minute of diffusion (ddcm with one whole-latent tile codes 20 steps of a 4 MP image in 43 bytes).
So a decoder's time and memory are bounded by `max_pixels`, whatever the stream claims, and a network
decoder's time by the stream's own size too.

A `lossless` codec (jxl with lossless=1) decodes the pixels it was given exactly, and may also keep a source
file whole: `encode` then takes each image's file beside its pixels (`originals`), and `original` gives
the file back from the stream, byte for byte (jxl: a JPEG, through JPEG XL's JPEG reconstruction data).

    images + originals ──encode──► streams ──original──► the source files it kept (None for the others)
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from . import container
from .container import Header
from .errors import BitstreamError, ParameterError
from .parts.imagefile import DEFAULT_MAX_PIXELS

# Bounds on one stream's decoding, relative to the caller's pixel limit (module docstring).
MAX_PASSES = 100  # latent-denoise's most steps; ddcm may take more only on smaller images
MAX_PADDING = 4  # a 1-pixel strip padded to a network's multiple works on up to 32× its pixels
MIN_PASS_PIXELS = 128 * 128  # a network pass on a tiny latent still costs about this much (fixed overheads)
# A network decoder's budget from the stream itself, in pixels × passes: what any stream may ask for (a
# Kodak image over 42 passes; a 1 MP one over 16), and then per byte of payload. The thinnest shipped
# settings need about 5 000 per byte (ddcm 0.02bpp: 13 passes over 400 pixels a byte; hfd 0.02bpp: 2 over
# 400), so 65 536 leaves them a dozen times that; only whole-latent ddcm tiles (tile=0) above ~1 MP exceed it.
FREE_WORK = 1 << 24
WORK_PER_BYTE = 1 << 16

# Fingerprints of shipped weights that were replaced, and by what: a stream naming one is refused with the
# reason and the way back, which is clearer than a mismatch of two hashes. Keyed by what a stream records
# (latent-denoise records the model's and its predictors' weights together).
RETIRED_FINGERPRINTS = {
    bytes.fromhex("823d583da226a3a79f7ccd0f7b22b9ac652d20ffd6d29e84aab1bd99f1b656b7"):
        "builtin:ldm-small's old latent-denoise predictors, whose per-channel entropy model the mean-scale "
        "hyperprior replaced",
}  # fmt: skip
RETIRED_HELP = ("decode it with a diffarc release from before that change, or pass --model a folder of those "
                "weights (an archive written with --embed-model carries them)")  # fmt: skip


def retired_weights(fingerprint: bytes) -> str | None:
    """Why no shipped weights decode streams of `fingerprint` any more, and what will; None if not retired."""
    reason = RETIRED_FINGERPRINTS.get(fingerprint)
    return None if reason is None else f"stream was written with {reason}; {RETIRED_HELP}"


@dataclass(frozen=True)
class DecodeCost:
    """What decoding one stream takes, known from its header and payload length before any decoding."""

    pixels: int  # pixels the decoder works on, padding included
    passes: int = 1  # full passes over them: network evaluations (an autoencoder's decode counts as one)


@dataclass(frozen=True)
class EncoderNeeds:
    """What a codec's encoder needs (`Codec.encoder_needs`)."""

    gpu: bool  # worth a GPU where the cluster has them
    weights: bool  # loads model weights to encode


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
    # Applied when the codec is built (its weights are cast to it): a decoder takes only its own value.
    build_time: bool = False
    # A decoder may set it for every stream it decodes (`Codec.override`), the stream's value being the
    # encoder's default: a knob of the decoded picture that changes nothing the encoder wrote.
    decode_time: bool = False
    # What a stream that does not name this parameter was written with: it was added after such streams
    # (None: every stream names it). The default is what new streams get.
    absent: Any = None

    def parse(self, value: Any) -> Any:
        """Turn a user's value (often a command-line string) into a checked value of this parameter."""
        try:
            parsed = self.kind(value)
            # A stream's JSON may hold 1e999 or NaN, which no bound below would catch (NaN compares false).
            if isinstance(parsed, float) and not math.isfinite(parsed):
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "…"
            raise ParameterError(f"parameter {self.name!r} needs a {self.kind.__name__}, got {shown}") from None
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
    # A decoder of a base layer alone (`base_decoder`) uses no weights, so it reads streams of any weights.
    decodes_any_weights: bool = False
    # Decodes the pixels it encoded exactly, and takes source files to keep (module docstring); a codec that
    # is lossless only in some settings makes this a property.
    lossless: bool = False

    def __init__(self, device: str = "cpu", **params: Any):
        self.device = device
        self.config = self.resolve_params(params)
        self.decode_overrides: dict[str, Any] = {}

    @classmethod
    def check_overrides(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """Checked values of decode-time parameters (`decode --param`); ParameterError names any other."""
        known = {p.name: p for p in cls.params if p.decode_time}
        for name in params:
            if name not in known:
                raise ParameterError(
                    f"codec {cls.name!r} has no parameter {name!r} that a decoder may set; it has "
                    f"{sorted(known) or 'none'}"
                )
        return {name: known[name].parse(value) for name, value in params.items()}

    def override(self, params: Mapping[str, Any]) -> None:
        """Decode every stream with these values of decode-time parameters instead of the stream's own."""
        self.decode_overrides = self.check_overrides(params)

    def stream_config(self, header: Header) -> dict[str, Any]:
        """The parameters one stream decodes with: its header's, overlaid by the decoder's overrides."""
        older = {p.name: p.absent for p in self.params if p.absent is not None}
        return self.resolve_params({**older, **header.params, **self.decode_overrides})

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
        resolved = {name: known[name].parse(value) for name, value in values.items()}
        cls.check_config(resolved)
        return resolved

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Refuse (ParameterError) a combination of checked values the codec cannot use together; an
        encoder's settings and every stream's header pass through here. No rule by default."""

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
    def builtin_weights(cls) -> dict[str, dict[str, Any]]:
        """The built-in weights (builtin:NAME) this codec loads by default, each with the parameters that
        load it: the defaults of its location parameters. A codec whose default depends on another
        parameter (hfd's on its base) lists them itself."""
        return {p.default: {} for p in cls.params if p.location and str(p.default).startswith("builtin:")}

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

    def weights_files(self) -> dict[str, Any]:
        """Every file this codec's loaders read (a Path), by its path in one weights folder laid out as
        `weights_folders` says: what `encode --embed-model` copies. ModelError for weights that are not in
        a local folder."""
        from pathlib import Path

        from .errors import ModelError
        from .parts.models import weights_files

        files = {}
        for subfolder, source in self.weights_folders().items():
            if source is None:
                raise ModelError(f"{self.name} weights {self.locations} are not in a local folder (a hub id?); "
                                 "download them to a folder to embed them")  # fmt: skip
            for relative in weights_files(Path(source)):
                files[f"{subfolder}/{relative}" if subfolder else relative] = Path(source) / relative
        return files

    @property
    def hint(self) -> dict[str, Any]:
        """Where this codec's weights were found, as an archive records it: its location parameters, local
        folders as absolute paths (they name the same folder from any working directory)."""
        from .parts.models import canonical_reference

        return {k: canonical_reference(v) if isinstance(v, str) else v for k, v in self.locations.items()}

    @classmethod
    def check_locations(cls, params: Mapping[str, Any]) -> None:
        """ModelError now for a location parameter naming a built-in or local folder that does not exist
        (cheap); URLs and hub ids are left to the loaders, since resolving one would download it."""
        references = [v for v in cls.split_params(params)[1].values() if isinstance(v, str) and v and "://" not in v]
        if references:
            from .parts.models import resolve_folder

            for reference in references:
                resolve_folder(reference)

    @classmethod
    def encoder_needs(cls, params: Mapping[str, Any]) -> "EncoderNeeds":
        """What encoding with these (resolved) parameters needs: a GPU if one is there, and the model weights
        at all. By default a codec with weights wants both; one whose encoder is classical (hfd's AVIF base)
        says so, and its encode actors then take no GPU and load no network."""
        weights = any(p.location for p in cls.params)
        return EncoderNeeds(gpu=weights, weights=weights)

    @classmethod
    def encoder(cls, params: Mapping[str, Any], fingerprint: bytes, device: str = "cpu") -> "Codec":
        """The codec an encode worker encodes with, for streams of the weights named by `fingerprint` (the
        archive's spec): the codec itself by default. A codec whose encoder needs no weights
        (`encoder_needs`) may build one that loads none and records `fingerprint` (hfd's AVIF base)."""
        return cls(device, **cls.resolve_params(params))

    @property
    def fingerprint(self) -> bytes:
        """Content hash of the model weights this codec decodes with; empty for codecs without weights."""
        return b""

    def stream_stats(self, stream: bytes) -> dict[str, float]:
        """Figures a codec reports about one of its streams beyond its size (the bench averages them)."""
        return {}

    def encode(self, images: Sequence[np.ndarray], originals: Sequence[bytes | None] | None = None) -> list[bytes]:
        """One stream per image. `originals`: each image's source file (None where there is none), which a
        `lossless` codec may keep whole (module docstring); other codecs code the pixels alone."""
        for image in images:
            check_image(image)
        if originals is not None and len(originals) != len(images):
            raise ValueError(f"{len(images)} images but {len(originals)} originals")
        if self.lossless and originals is not None:
            payloads = self.encode_originals(list(images), list(originals))
        else:
            payloads = self.encode_payloads(list(images))
        return [
            container.pack(
                Header(self.name, self.stream_params, self.fingerprint, width=image.shape[1], height=image.shape[0]),
                payload,
            )
            for image, payload in zip(images, payloads, strict=True)
        ]

    def decode(self, streams: Sequence[bytes], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
        """One image per stream; every stream is checked (`read`) before any is decoded."""
        return self.decode_checked([self.read(stream, max_pixels) for stream in streams])

    def decode_checked(self, parsed: Sequence[tuple[Header, bytes]]) -> list[np.ndarray]:
        """One image per (header, payload) that `check` (or `read`) has passed: a caller that parsed its
        streams once (an archive reader) decodes them without parsing them again."""
        images = self.decode_payloads([p for _, p in parsed], [h for h, _ in parsed])
        for (header, _), image in zip(parsed, images, strict=True):
            if image.shape != (header.height, header.width, 3) or image.dtype != np.uint8:
                raise BitstreamError(
                    f"{self.name} decoded a {image.shape} {image.dtype} image; the stream says "
                    f"{header.height}×{header.width}"
                )
        return images

    def original(self, stream: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | None:
        """The source file this stream keeps whole, byte for byte; None when it keeps the pixels alone. The
        stream is checked (`read`) first."""
        return self.original_checked(*self.read(stream, max_pixels))

    def original_checked(self, header: Header, payload: bytes) -> bytes | None:
        """`original` of a stream that `check` (or `read`) has passed: a `lossless` codec's override."""
        return None

    def keeps_original(self, payload: bytes) -> bool:
        """Whether a payload this codec wrote keeps its source file whole (no decoding: what an encoder
        records about the stream it has just made)."""
        return False

    def encode_originals(self, images: list[np.ndarray], originals: list[bytes | None]) -> list[bytes]:
        """One payload per image, keeping what it can of each source file: a `lossless` codec's override."""
        return self.encode_payloads(images)

    def read(self, stream: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Header, bytes]:
        """Unpack a stream and refuse it unless this codec, with these weights, can decode it within
        `max_pixels` (module docstring)."""
        header, payload = container.unpack(stream)
        self.check(header, payload, max_pixels)
        return header, payload

    def check(self, header: Header, payload: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        """`read`'s checks of a stream already unpacked (`container.unpack_any`)."""
        self.check_header(header, header.fingerprint if self.decodes_any_weights else self.fingerprint)
        for param in (p for p in self.params if p.build_time):
            wanted = param.parse(header.params.get(param.name, param.default))  # check_header has parsed it
            if wanted != self.config[param.name]:
                raise BitstreamError(
                    f"stream needs {self.name} built with {param.name}={wanted}; this decoder was built with "
                    f"{param.name}={self.config[param.name]} (open it with the stream's parameters)"
                )
        self.check_cost(header, payload, max_pixels)

    def check_cost(self, header: Header, payload: bytes, max_pixels: int) -> None:
        """Refuse a stream whose size or decoding work is over what `max_pixels` allows (module docstring)."""
        check_pixels(header, max_pixels)
        cost = self.decode_cost(header, payload)
        if cost.pixels > max(MAX_PADDING * max_pixels, MIN_PASS_PIXELS):
            raise BitstreamError(
                f"{self.name} would decode {header.width}×{header.height} as {cost.pixels} pixels (padding "
                f"included), over {MAX_PADDING}× the limit of {max_pixels}"
            )
        work = max(cost.pixels, MIN_PASS_PIXELS) * cost.passes
        if work > MAX_PASSES * max(max_pixels, MIN_PASS_PIXELS):
            raise BitstreamError(
                f"{self.name} stream asks for {cost.passes} passes over {cost.pixels} pixels, over the "
                f"{MAX_PASSES} passes over {max_pixels} pixels the limit allows"
            )
        budget = max(FREE_WORK, WORK_PER_BYTE * len(payload))
        if self.fingerprint and work > budget:
            raise BitstreamError(
                f"{self.name} stream of {len(payload)} payload bytes asks for {cost.passes} passes over {cost.pixels} "
                f"pixels, over the {budget} pixel-passes a stream of its size may (codecs/base.py, FREE_WORK and "
                "WORK_PER_BYTE)"
            )

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """The pixels and passes decoding this (checked) stream takes; BitstreamError for a payload that cannot
        be what the header says. Cheap: arithmetic on the header and the payload's length, never a decode."""
        return DecodeCost(header.width * header.height)

    @classmethod
    def check_header(cls, header: Header, fingerprint: bytes) -> None:
        """Refuse a stream's header unless this codec, holding weights with `fingerprint`, can decode it.
        A class method: checking an archive's streams needs no weights loaded."""
        if header.codec != cls.name:
            raise BitstreamError(f"stream was written by codec {header.codec!r}, not {cls.name!r}")
        if header.fingerprint != fingerprint:
            if retired := retired_weights(header.fingerprint):
                raise BitstreamError(retired)
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


def check_pixels(header: Header, max_pixels: int) -> None:
    """Refuse a stream that declares no pixels or more than `max_pixels`; needs no codec (verify uses it)."""
    if header.width < 1 or header.height < 1:
        raise BitstreamError(f"stream declares a {header.width}×{header.height} image, which has no pixels")
    if header.width * header.height > max_pixels:
        raise BitstreamError(
            f"stream declares {header.width}×{header.height} = {header.width * header.height} pixels, "
            f"over the limit of {max_pixels}"
        )


def check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
        raise ValueError(f"codecs take H×W×3 uint8 RGB arrays, got {got}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image has no pixels: {image.shape}")
