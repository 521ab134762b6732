"""HFD: a fidelity-first base codec plus a conditional diffusion / flow detail decoder (Hoogeboom et al.
2023, "High-Fidelity Image Compression with Score-based Generative Models"; seed 000).

    encoder: image ─► base payload (bases.py: AVIF at `quality`, coded at 1/`scale` resolution; or the
             learned hyperprior codec at step `base_step` with `base=hyperprior`)
    decoder: payload ─► base b ─► detail decoder (detail.py), `steps` flow calls from seeded noise ─► r̂ ─► b + r̂ ─► image
             pixel decoder (builtin:hfd-small): the flow on the residual in pixels
             latent decoder (builtin:taef2): b ─► taef2 encoder ─► the flow on the latent's residual ─►
                                            taef2 decoder, below σ px the base's own frequencies

All the bits go to the base, which a fidelity-optimised codec spends where the content is; the detail
decoder only adds what the base lost (texture, sharpness), so it cannot lose the content, and
`steps=0` returns the base itself.

Choices made here (the paper leaves the base open; its own is a learned MSE codec):
- The default base is plain AVIF (the best classical codec Pillow ships), so an archive stays readable
  by any AVIF decoder and by `diffarc decode --base-only` if the weights are ever lost. `base=hyperprior`
  is the paper's learned MSE base; its detail decoder is trained on its pictures and keeps the
  hyperprior model in its folder (bases.py), so `model` defaults to the built-in decoder of the base.
- `scale` 2 or 4 codes the base at reduced resolution: the only way to go under AVIF's rate floor
  (about 0.07 bpp on Kodak) without its quality-0 artefacts; the detail decoder upsamples.
- One decoder serves every quality and scale: both are inputs to the network (nets.py).
- `model` names a pixel decoder's folder (its network's config.json and weights) or a latent model's folder
  (an autoencoder's vae/ with the latent network in hfd/: `builtin:taef2`, or what `diffarc train hfd
  --config latent-small` writes); the folder's layout says which. The pixel decoder learned to add an even
  grain (MODELS.md); the latent one lets taef2's decoder render texture (detail.py).
- The start noise comes from the counter-based field of `parts/noise.py` keyed by the stream's `seed`, so
  a decode is the same on any machine and device up to float rounding.
- `detail` blends the sample toward the first network call's estimate (the posterior mean, i.e. the
  restoration): 0 gives the best PSNR, 1 the full sample. Defaults, steps 2 and detail 0.5, chosen on 8
  Kodak images at quality 10 (PSNR / LPIPS): 2 steps d 0.5 26.61 / 0.253, d 1 26.38 / 0.247; 4 steps
  d 0.5 26.40 / 0.247, d 1 25.64 / 0.277; AVIF alone 26.70 / 0.338.
- Images larger than TILE_PIXELS are decoded in overlapping tiles blended linearly across the overlap, so
  memory is bounded whatever the image size; smaller ones in one pass, so Kodak-sized pictures have no
  seams at all.

Payload: the base's AVIF file, nothing else; the parameters live in the stream header (or the archive's
spec table). bpp counts the whole stream.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..base import Codec, DecodeCost, EncoderNeeds, Param
from ..container import Header
from ..errors import ModelError, ParameterError
from ..parts.latents import padded_size, tensor_to_images
from ..parts.models import fingerprint, load_codec_model, load_model, resolve_folder
from .bases import BASES, HYPERPRIOR_FOLDER, STEP_RANGE, AvifBase, HyperpriorBase
from .detail import LATENT_FOLDER, LatentDetail, PixelDetail
from .nets import DetailDecoder

DEFAULT_DETAIL_MODELS = {"avif": "builtin:hfd-small", "hyperprior": "builtin:hfd-hyperprior-small"}
# Every shipped detail decoder and the base it was trained on: the latent one (taef2's hfd/), the pixel ones.
BUILTIN_DETAIL_MODELS = {"builtin:taef2": "avif", "builtin:hfd-small": "avif", "builtin:hfd-hyperprior-small": "hyperprior"}
TILE_PIXELS = 1024 * 1024  # larger padded images are decoded in tiles (memory bound; see the docstring)
TILE, OVERLAP = 512, 64  # tile side and overlap in pixels, multiples of the decoder's 16


@functools.lru_cache(maxsize=4)
def load_detail_decoder(reference: str, base: str, device: str) -> tuple[PixelDetail | LatentDetail, AvifBase | HyperpriorBase, dict, bytes]:
    """(detail decoder, base layer, weights folders, fingerprint) of a model reference for a `base`, once per
    process. A pixel decoder's folder holds its network (and, trained on hyperprior bases, that model in
    HYPERPRIOR_FOLDER); a latent decoder's is an autoencoder's folder (vae/) with the network in LATENT_FOLDER."""
    folder = resolve_folder(reference)
    if folder is not None and (folder / "vae").is_dir() and (folder / LATENT_FOLDER).is_dir():
        return _load_latent_decoder(reference, folder, base, device)
    network, folder = load_codec_model(reference, DetailDecoder, device, "train one with `diffarc train hfd --out FOLDER`")
    trained_on = "hyperprior" if (folder / HYPERPRIOR_FOLDER).is_dir() else "avif"
    _check_base(reference, trained_on, base)
    modules = {"detail": network}
    folders = {"": folder}
    if base == "hyperprior":
        layer = HyperpriorBase(folder / HYPERPRIOR_FOLDER, device)
        modules["hyperprior"] = layer.codec.model
        folders[HYPERPRIOR_FOLDER] = folder / HYPERPRIOR_FOLDER
    else:
        layer = AvifBase()
    return PixelDetail(network), layer, folders, fingerprint(modules, schedule=_meaning(network))


def _load_latent_decoder(reference: str, folder: Path, base: str, device: str):
    _check_base(reference, "avif", base)
    network = load_codec_model(str(folder / LATENT_FOLDER), DetailDecoder, device, "train one with `diffarc train hfd --config latent-small`")[0]
    autoencoder = load_model(reference, device)
    # The autoencoder's weights and latent scaling, not the model's: a UNet trained into the same folder
    # (another codec's part) changes nothing for these streams.
    modules = {"vae": autoencoder.vae, "detail": network}
    scaling = (autoencoder.scaling_factor, autoencoder.shift_factor)
    folders = {"vae": folder / "vae", LATENT_FOLDER: folder / LATENT_FOLDER}
    return LatentDetail(autoencoder, network), AvifBase(), folders, fingerprint(modules, scaling, _meaning(network))


def _check_base(reference: str, trained_on: str, base: str) -> None:
    if trained_on != base:
        raise ModelError(
            f"the detail decoder {reference} was trained on {trained_on} bases, not {base}; "
            f"use model={DEFAULT_DETAIL_MODELS[base]} or one trained with `diffarc train hfd --config {'small-hyperprior' if base == 'hyperprior' else 'latent-small'}`"
        )


def _meaning(network: DetailDecoder) -> bytes:
    """The objective and its constants change what the weights mean: they are part of the identity."""
    return json.dumps({k: network.config[k] for k in ("objective", "sigma", "shift", "space_to_depth")}, sort_keys=True).encode("utf-8")


class HfdCodec(Codec):
    name = "hfd"
    description = "AVIF (or learned hyperprior) base plus a rectified-flow detail decoder (HFD, Hoogeboom et al. 2023)."
    params = (
        Param("model", str, "", "detail decoder: builtin:NAME, folder or URL; default: the built-in one of the base",
              location=True),
        Param("base", str, "avif", "base layer: avif (readable without weights) or hyperprior (learned)", choices=BASES),
        Param("quality", int, 20, "avif base: AVIF quality, 0 (smallest) to 50", minimum=0, maximum=50),
        Param("scale", int, 1, "avif base: coded at 1/scale resolution; the decoder upsamples", choices=(1, 2, 4)),
        Param("speed", int, 6, "avif base: AVIF encoder speed, 0 (slow, smaller) to 10 (fast)", minimum=0, maximum=10),
        Param("base_step", float, 2.0, "hyperprior base: quantization step Δ, the rate knob (larger: fewer bits)",
              minimum=STEP_RANGE[0], maximum=STEP_RANGE[1]),
        Param("steps", int, 2, "detail decoder calls; 0 decodes the base alone", minimum=0, maximum=64),
        Param("detail", float, 0.5, "0: the restoration (a latent decoder: the base) … 1: the full sample (most texture)",
              minimum=0.0, maximum=1.0),
        Param("seed", int, 0, "seed of the start noise", minimum=0, maximum=0xFFFFFFFF),
    )  # fmt: skip
    # Named by Kodak bpp; PSNR / LPIPS-squeeze on Kodak (`diffarc bench`, MODELS.md): 0.024 bpp 22.8 dB / 0.525,
    # 0.057 bpp 24.9 / 0.347, 0.11 bpp 26.8 / 0.234, 0.17 bpp 28.1 / 0.179, 0.32 bpp 30.4 / 0.108.
    presets = {
        "0.02bpp": {"quality": 20, "scale": 4},
        "0.05bpp": {"quality": 20, "scale": 2},
        "0.1bpp": {"quality": 10},
        "0.17bpp": {"quality": 20},
        "0.3bpp": {"quality": 35},
    }

    def __init__(self, device: str = "cpu", base_only: bool = False, **params):
        super().__init__(device, **params)
        self.base_only = self.decodes_any_weights = base_only
        self.encodes_for: bytes | None = None  # an `encoder`'s: the detail decoder's fingerprint, not loaded
        if base_only:
            self.base_layer, self.folders = AvifBase(), {}
        else:
            reference = self.config["model"] or DEFAULT_DETAIL_MODELS[self.config["base"]]
            self.decoder, self.base_layer, self.folders, self._fingerprint = load_detail_decoder(
                reference, self.config["base"], str(device)
            )

    @classmethod
    def builtin_weights(cls) -> dict[str, dict]:
        """Every shipped detail decoder, the defaults and those they replaced, whose streams keep decoding
        (`registry.open_codec` tries them all)."""
        return {reference: {"model": reference, "base": base} for reference, base in BUILTIN_DETAIL_MODELS.items()}

    @classmethod
    def encoder(cls, params: dict, fingerprint: bytes, device: str = "cpu") -> "HfdCodec":
        """An AVIF base is coded by Pillow alone, so its encoder loads no detail decoder: the base-only codec,
        its streams stamped with `fingerprint` (the decoder's, from the archive's spec). It does not decode.
        A hyperprior base is encoded by its network: the whole codec."""
        if cls.encoder_needs(params).weights:
            return super().encoder(params, fingerprint, device)
        codec = cls(device, base_only=True, **cls.split_params(cls.resolve_params(params))[0])
        codec.decodes_any_weights, codec.encodes_for = False, fingerprint
        return codec

    @classmethod
    def encoder_needs(cls, params: dict) -> EncoderNeeds:
        """An AVIF base is encoded by Pillow on the CPU: no GPU; the hyperprior base runs its network."""
        learned = cls.resolve_params(cls.split_params(params)[0])["base"] == "hyperprior"
        return EncoderNeeds(gpu=learned, weights=learned)

    @classmethod
    def check_config(cls, config: dict) -> None:
        if config["base"] == "hyperprior" and config["scale"] != 1:
            raise ParameterError("hfd's hyperprior base is coded at full resolution: scale must be 1 with base=hyperprior")

    @classmethod
    def base_decoder(cls, params: dict, device: str = "cpu") -> "HfdCodec":
        """A decoder of the AVIF base layer alone: needs no weights and accepts streams of any weights."""
        stream_params = cls.split_params(params)[0]
        if cls.resolve_params(stream_params)["base"] != "avif":
            raise ParameterError("--base-only decodes hfd's avif base without weights; a hyperprior base needs its model")
        return cls(device, base_only=True, **stream_params)

    @property
    def fingerprint(self) -> bytes:
        if self.encodes_for is not None:
            return self.encodes_for
        return b"" if self.base_only else self._fingerprint

    def weights_folders(self) -> dict:
        return dict(self.folders)

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """The base's pixels, plus `steps` detail-decoder passes over the padded picture (a latent decoder's
        flow runs on 1/64 of them, but its autoencoder passes, one each way, cost more: counted as 2 + steps)."""
        steps = self.resolve_params(header.params)["steps"]
        if self.base_only or not steps:
            return DecodeCost(header.width * header.height)
        height, width = self._padded(header.height, header.width)
        return DecodeCost(height * width, steps + 2 if isinstance(self.decoder, LatentDetail) else steps)

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        return [self.base_layer.encode(image, self.config) for image in images]

    @torch.inference_mode()
    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        if self.encodes_for is not None:
            raise ModelError("this hfd codec encodes AVIF bases without its detail decoder; it does not decode")
        # One image at a time: sizes differ within a batch, and a large image is tiled anyway.
        return [self._decode_one(payload, header) for payload, header in zip(payloads, headers, strict=True)]

    def _decode_one(self, payload: bytes, header: Header) -> np.ndarray:
        config = self.resolve_params(header.params)
        base = self.base_picture(payload, header)
        if config["steps"] and not self.base_only:
            base = (base + self.detail(base.to(self.device), config)).clamp(-1, 1)
        return tensor_to_images(base, [(header.height, header.width)])[0]

    def base_picture(self, payload: bytes, header: Header) -> torch.Tensor:
        """The base picture of one payload, (1, 3, H, W) in [−1, 1] on the CPU; BitstreamError if damaged."""
        return self.base_layer.decode(payload, header.height, header.width, self.resolve_params(header.params))

    def detail(self, base: torch.Tensor, config: dict, network: torch.nn.Module | None = None) -> torch.Tensor:
        """r̂ for a base (1, 3, H, W): in one pass, or in overlapping tiles above TILE_PIXELS. `network` is the
        flow network to sample with: the decoder's own by default; corrdiff passes its corrected one."""
        network = self.decoder.network if network is None else network
        height, width = base.shape[2:]
        padded = self._padded(height, width)
        if padded[0] * padded[1] <= TILE_PIXELS:
            return self._residual(base, config, (0, 0), padded, network)
        out = torch.zeros_like(base)
        weight = torch.zeros(1, 1, height, width, device=base.device)
        for top in _tile_starts(height):
            for left in _tile_starts(width):
                tile = base[:, :, top : top + TILE, left : left + TILE]
                h, w = tile.shape[2:]
                ramp = _ramp(h, top, height).view(1, 1, -1, 1) * _ramp(w, left, width).view(1, 1, 1, -1)
                residual = self._residual(tile, config, (top, left), self._padded(h, w), network)
                out[:, :, top : top + h, left : left + w] += residual * ramp.to(base.device)
                weight[:, :, top : top + h, left : left + w] += ramp.to(base.device)
        return out / weight

    def _padded(self, height: int, width: int) -> tuple[int, int]:
        """The decoder's input size: multiples of its grid, and two grid cells at least, since its group
        norms need more than one value per group at the deepest level."""
        multiple = self.decoder.multiple
        return tuple(max(2 * multiple, side) for side in padded_size(height, width, multiple))

    def _residual(self, base: torch.Tensor, config: dict, origin: tuple[int, int], padded: tuple[int, int], network) -> torch.Tensor:
        height, width = base.shape[2:]
        # Replicated borders: defined for any size down to 1×1 (reflection needs two pixels).
        x = F.pad(base, (0, padded[1] - width, 0, padded[0] - height), mode="replicate")
        residual = self.decoder.residual(x, config, self.base_layer.rate(config), origin, network)
        return residual[:, :, :height, :width]


def _tile_starts(length: int) -> list[int]:
    """Tile origins along one axis: TILE apart minus OVERLAP, the last one flush with the end."""
    if length <= TILE:
        return [0]
    starts = list(range(0, length - TILE, TILE - OVERLAP))
    return starts + [length - TILE]


def _ramp(size: int, start: int, length: int) -> torch.Tensor:
    """Blending weights along a tile: rising over the overlap on sides that have a neighbour, else flat."""
    ramp = torch.ones(size)
    rise = torch.linspace(1.0 / (OVERLAP + 1), 1.0, OVERLAP)
    if start > 0:
        ramp[:OVERLAP] = rise
    if start + size < length:
        ramp[-OVERLAP:] = torch.minimum(ramp[-OVERLAP:], rise.flip(0))
    return ramp
