"""HFD's two detail decoders: where the flow runs, and how its result becomes the picture's residual.

    pixel   base b ─pad─► flow on r = x − b in pixels (DetailDecoder on a space-to-depth grid) ─► r̂
    latent  base b ─pad─► taef2 encoder ─► z_b ─► flow on r = z_x − z_b in the latent (DetailDecoder,
            32 channels at 1/8 resolution) ─► ẑ = z_b + r̂ ─► taef2 decoder ─► D(ẑ)
            ─► picture = D(ẑ) + low-pass(b − D(ẑ)) ─► r̂ = picture − b

Both are called the same way (`residual(base, config, rate, origin, network)`) by the codec's tiling
(codec.py), on a whole picture or on one tile, with `network` the flow network to sample with: the
decoder's own, or a corrected one (corrdiff passes its corrected network, so it runs HFD's padding,
noise and sampler unchanged).

The pixel decoder is the design of `builtin:hfd-small`: a 1.85 M-parameter network in pixel space that,
trained on two cores, learned to lay an even grain over the base (MODELS.md). The latent decoder moves the
flow into the latent of taef2 (`codecs/parts/taef2.py`), whose decoder renders texture from a latent
(30.2 dB / LPIPS 0.028 round trip on Kodak): the network only has to move the base's latent toward the
original's, at 1/64 of the positions, and taef2's decoder turns that into texture.

Choices of the latent decoder (the paper has no latent variant):
- The flow runs on the residual of the unit-variance latents (taef2's scaling 1.19), from σ·ε at τ = 1
  to r = z_x − z_b at τ = 0, predicting r̂ as the pixel decoder does (nets.py).
- **Low frequencies come from the base.** taef2's round trip alone is 30.2 dB, about AVIF's PSNR at
  quality 35, and it shifts colours slightly; so the decoded latent gives the picture its high
  frequencies only, and the base everything below a Gaussian of std σ pixels:
  picture = D(ẑ) + G_σ ∗ (b − D(ẑ)). AVIF keeps finer detail at higher quality and at full resolution,
  so σ shrinks with quality and grows with the scale: σ = scale · 4^(1 − quality / 35), 4 px at quality
  0, 1 px at quality 35 (`low_pass_sigma`). At `steps=0` nothing of this runs (the base itself).
- **`detail` scales the change in pixels**: picture = b + detail · (the sample's picture − b), the sample
  drawn with `steps` calls. The pixel decoder blends its residual between the first estimate (the
  restoration) and the sample; in the latent that does not work: the latent-MSE estimate is not a
  fidelity restoration once decoded (a mean of latents is texture of random phase to taef2's decoder: on
  held-out training images at quality 20 it cost 2.4 dB, more than the sample), and latents between two
  estimates decode to neither. The pixels' change is what the PSNR pays for, so that is what is scaled:
  0 is the base, 1 the full sample.
- One taef2 encoder pass and one decoder pass per picture (or tile): the flow's `steps` calls run at
  latent resolution, where they cost a fraction of either pass.
- The start noise is the counter-based field of `parts/noise.py` at latent resolution, keyed by the
  stream's seed, its origin the tile's origin / 8: the same on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..parts.latents import decode_latents, encode_latents
from ..parts.models import LatentDiffusionModel
from ..parts.noise import gaussian
from .nets import DetailDecoder, sample_residual

LATENT_DOWNSAMPLING = 8  # taef2: one latent position per 8 × 8 pixels
LATENT_FOLDER = "hfd"  # inside an autoencoder's model folder (beside vae/): the latent detail decoder's network


def conditions(base: torch.Tensor, rate: float, config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The network's rate and scale inputs for one picture, (1,) each."""
    return (torch.tensor([rate], device=base.device), torch.tensor([float(config["scale"])], device=base.device))


class PixelDetail:
    """The flow on the residual in pixels (`builtin:hfd-small`)."""

    def __init__(self, network: DetailDecoder):
        self.network = network

    @property
    def multiple(self) -> int:
        """Pixels: the padded picture's sides are multiples of this."""
        return self.network.multiple

    def residual(self, base: torch.Tensor, config: dict, rate: float, origin: tuple[int, int],
                 network: torch.nn.Module) -> torch.Tensor:  # fmt: skip
        """r̂ for a base (1, 3, H, W) already padded to `multiple`."""
        noise = gaussian(config["seed"], 0, [0], tuple(base.shape[1:]), origin=origin).to(base.device)
        return sample_residual(network, base, *conditions(base, rate, config), noise, config["steps"], config["detail"])


class LatentDetail:
    """The flow on the residual of taef2 latents, decoded and fused with the base (module docstring)."""

    def __init__(self, autoencoder: LatentDiffusionModel, network: DetailDecoder):
        self.autoencoder, self.network = autoencoder, network

    @property
    def multiple(self) -> int:
        return LATENT_DOWNSAMPLING * self.network.multiple

    def residual(self, base: torch.Tensor, config: dict, rate: float, origin: tuple[int, int],
                 network: torch.nn.Module) -> torch.Tensor:  # fmt: skip
        latent = encode_latents(self.autoencoder, base)
        noise = gaussian(config["seed"], 0, [0], tuple(latent.shape[1:]),
                         origin=(origin[0] // LATENT_DOWNSAMPLING, origin[1] // LATENT_DOWNSAMPLING)).to(base.device)  # fmt: skip
        # The sample (the last estimate): `detail` scales the picture's change, not the latent's (docstring).
        restored = latent + sample_residual(network, latent, *conditions(base, rate, config), noise, config["steps"], 1.0)
        decoded = decode_latents(self.autoencoder, restored).float()
        picture = decoded + low_pass(base - decoded, low_pass_sigma(rate, config["scale"]))
        return config["detail"] * (picture - base)


def low_pass_sigma(quality: float, scale: int) -> float:
    """Pixels: the scale below which the picture is the base's (module docstring)."""
    return scale * 4.0 ** (1.0 - quality / 35.0)


def low_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of std `sigma` pixels, replicated borders (defined down to 1×1)."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    taps = (taps / taps.sum()).to(x.device, x.dtype)
    channels = x.shape[1]
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, taps.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
