"""CorrDiff's end-to-end decoder: the MSE estimate of the residual from what the stream transmits.

    base b (HFD's decoded base picture, [-1, 1]) and its quality and scale
    b ─space-to-depth ×4─► ⊕ quality, scale channels ─► UNet2DModel ─depth-to-space─► r̂_e ≈ E[x − b | b]

It is HFD's `DetailDecoder` without the sampler's state: the same grid, conditions and UNet, so it can
start from the detail decoder's weights (`from_detail_decoder`) and train in minutes on a CPU. The UNet's
time input is held at the start time τ = 1 (the call whose estimate is the restoration), so the copied
weights begin where they already estimate E[r | b]. Trained for MSE only (task.py): it is the
fidelity end of CorrDiff's knob and the estimate that corrects the sampler (correction.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..hfd.nets import TIMESTEP_SCALE, DetailDecoder


class EndToEndDecoder(ModelMixin, ConfigMixin):
    """r̂_e = network(base, quality, scale); see the module docstring."""

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (48, 64, 96), layers_per_block: int = 1, space_to_depth: int = 4,
                 channels: int = 3):  # fmt: skip
        super().__init__()
        # HFD's UNet (zero output layer included: an untrained decoder returns the base), its input
        # convolution narrowed to [base, conditions].
        self.unet = DetailDecoder(widths=widths, layers_per_block=layers_per_block, space_to_depth=space_to_depth,
                                  channels=channels).unet  # fmt: skip
        wide = self.unet.conv_in
        self.unet.conv_in = torch.nn.Conv2d(wide.in_channels - self.state_channels, wide.out_channels, wide.kernel_size,
                                            padding=wide.padding)  # fmt: skip

    @property
    def state_channels(self) -> int:
        """Input channels the detail decoder gives its sampler state, which this decoder does not have."""
        return self.config.channels * self.config.space_to_depth**2

    @classmethod
    def from_detail_decoder(cls, detail: DetailDecoder) -> "EndToEndDecoder":
        """A decoder with the detail decoder's weights, less the input columns of its sampler state."""
        config = detail.config
        decoder = cls(widths=tuple(config.widths), layers_per_block=config.layers_per_block, space_to_depth=config.space_to_depth,
                      channels=config.channels)  # fmt: skip
        weights = dict(detail.unet.state_dict())
        weights["conv_in.weight"] = weights["conv_in.weight"][:, decoder.state_channels :].clone()  # [state, base, conditions]
        decoder.unet.load_state_dict(weights)
        return decoder

    @property
    def multiple(self) -> int:
        """Inputs' height and width must be multiples of this (space-to-depth times the UNet's downsamplings)."""
        return self.config.space_to_depth * 2 ** (len(self.config.widths) - 1)

    def forward(self, base, quality, scale) -> torch.Tensor:
        """r̂_e for bases (B, channels, H, W), qualities and scales (B,)."""
        b, _, h, w = base.shape
        factor = self.config.space_to_depth
        conditions = torch.stack([quality / 50.0, torch.log2(scale) / 2.0], 1).to(base.dtype)
        grid = conditions.view(b, 2, 1, 1).expand(b, 2, h // factor, w // factor)
        x = torch.cat([F.pixel_unshuffle(base, factor), grid], 1)
        start = torch.full((b,), TIMESTEP_SCALE, device=base.device)
        return F.pixel_shuffle(self.unet(x, start, return_dict=False)[0], factor)
