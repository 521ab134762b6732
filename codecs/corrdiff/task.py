"""Training CorrDiff's end-to-end decoder (`diffarc train corrdiff --config small`).

    training image ─► HFD's base at a random (quality, scale) ─► the same random crop of image and base
    r = x − b ─► EndToEndDecoder(b, quality, scale) ─► r̂_e;  loss = ‖r̂_e − r‖²

The data, the bases (made by HFD's own functions, AVIF payloads kept in memory) and the MSE of the
residual are exactly those of HFD's detail-decoder task, so this task is that one with a different
network: `wrap` presents the end-to-end decoder as a detail decoder whose estimate ignores the
sampler's state and time, and HFD's loss and validation run unchanged. MSE only, never LPIPS (the
bench's metric). Validation reports the PSNR gain of r̂_e over the base at scale 1 and 2.

Choices:
- `small` starts from the shipped HFD detail decoder's weights (`builtin:hfd-small`, less the input
  columns of its state), whose estimate at τ = 1 is already near E[r | b]: minutes of CPU training then
  go to restoration rather than to learning the grid. `tiny` starts from scratch (tests).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..hfd.nets import DetailDecoder
from ..hfd.task import DetailDecoderTask
from ..parts.models import resolve_folder
from .nets import EndToEndDecoder

CONFIGS: dict[str, dict] = {
    "tiny": dict(widths=(16, 16, 32)),
    "small": dict(widths=(48, 64, 96), start="builtin:hfd-small"),
}


class AsDetailDecoder(torch.nn.Module):
    """The end-to-end decoder behind the detail decoder's call signature: the state and time are ignored
    (the estimate sees only what the stream carries), so HFD's task trains and validates it as it is."""

    def __init__(self, decoder: EndToEndDecoder):
        super().__init__()
        self.decoder = decoder
        # What HFD's noisy_state reads to build the (ignored) state: any flow settings do.
        self.config = SimpleNamespace(objective="flow", sigma=1.0)

    def forward(self, state, base, quality, scale, t) -> torch.Tensor:
        return self.decoder(base, quality, scale)


class EndToEndDecoderTask(DetailDecoderTask):
    name = "corrdiff"
    model_class = EndToEndDecoder
    progress = ("mse {mse:.5f}", "e2e gain over the base s1 {val_gain_s1:+.2f} dB, s2 {val_gain_s2:+.2f} dB")
    configs = tuple(CONFIGS)

    def new_model(self) -> EndToEndDecoder:
        config = dict(CONFIGS[self.settings.config])
        start = config.pop("start", None)
        if start is None:
            return EndToEndDecoder(**config)
        detail = DetailDecoder.from_pretrained(str(resolve_folder(start)), use_safetensors=True, low_cpu_mem_usage=False)
        return EndToEndDecoder.from_detail_decoder(detail.float())

    def wrap(self, model: EndToEndDecoder) -> torch.nn.Module:
        return AsDetailDecoder(model)

    def validate(self, model: EndToEndDecoder) -> dict:
        return super().validate(AsDetailDecoder(model))
