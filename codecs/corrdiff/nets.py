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
from diffusers import UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..hfd.nets import TIMESTEP_SCALE, DetailDecoder


class EndToEndDecoder(ModelMixin, ConfigMixin):
    """r̂_e = network(base, quality, scale); see the module docstring."""

    @register_to_config
    def __init__(self, widths: tuple[int, ...] = (48, 64, 96), layers_per_block: int = 1, space_to_depth: int = 4):
        super().__init__()
        cells = 3 * space_to_depth**2
        self.unet = UNet2DModel(
            in_channels=cells + 2, out_channels=cells,
            down_block_types=("DownBlock2D",) * len(widths), up_block_types=("UpBlock2D",) * len(widths),
            block_out_channels=tuple(widths), layers_per_block=layers_per_block, add_attention=False,
            norm_num_groups=16, time_embedding_dim=128,
        )  # fmt: skip
        # Zero output: an untrained decoder returns the base, as HFD's does.
        torch.nn.init.zeros_(self.unet.conv_out.weight)
        torch.nn.init.zeros_(self.unet.conv_out.bias)

    @classmethod
    def from_detail_decoder(cls, detail: DetailDecoder) -> "EndToEndDecoder":
        """A decoder with the detail decoder's weights, less the input columns of its sampler state."""
        config = detail.config
        decoder = cls(widths=tuple(config.widths), layers_per_block=config.layers_per_block, space_to_depth=config.space_to_depth)
        weights = dict(detail.unet.state_dict())
        cells = 3 * config.space_to_depth**2
        weights["conv_in.weight"] = weights["conv_in.weight"][:, cells:].clone()  # [state, base, conditions] → [base, conditions]
        decoder.unet.load_state_dict(weights)
        return decoder

    @property
    def multiple(self) -> int:
        """Inputs' height and width must be multiples of this (space-to-depth times the UNet's downsamplings)."""
        return self.config.space_to_depth * 2 ** (len(self.config.widths) - 1)

    def forward(self, base, quality, scale) -> torch.Tensor:
        """r̂_e for bases (B, 3, H, W), qualities and scales (B,)."""
        b, _, h, w = base.shape
        factor = self.config.space_to_depth
        conditions = torch.stack([quality / 50.0, torch.log2(scale) / 2.0], 1).to(base.dtype)
        grid = conditions.view(b, 2, 1, 1).expand(b, 2, h // factor, w // factor)
        x = torch.cat([F.pixel_unshuffle(base, factor), grid], 1)
        start = torch.full((b,), TIMESTEP_SCALE, device=base.device)
        return F.pixel_shuffle(self.unet(x, start, return_dict=False)[0], factor)
