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
- `latent-small` is the end-to-end decoder of hfd's latent detail decoder: the same network on taef2's
  latent (r = z_x − z_b, hfd's latent pairs), started from the latent detail network of `--model` (a latent
  hfd model folder, vae/ + hfd/; default builtin:taef2). Its export is that folder with the end-to-end
  decoder added in corrdiff/, a model the codec loads whole (`model=FOLDER`).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from ..hfd.detail import LATENT_FOLDER
from ..hfd.nets import DetailDecoder
from ..hfd.task import CONFIGS as DETAIL_CONFIGS
from ..hfd.task import DEFAULT_AUTOENCODER, DetailDecoderTask, copy_weights, is_latent, model_folder
from ..parts.models import resolve_folder
from ..task import save_trained
from .codec import LATENT_END_TO_END_FOLDER
from .nets import EndToEndDecoder

FROM_MODEL = "--model"  # `start`: the latent detail network of the model the run builds on
CONFIGS: dict[str, dict] = {
    "tiny": dict(widths=(16, 16, 32)),
    "small": dict(widths=(48, 64, 96), start="builtin:hfd-small"),
    **{
        f"latent-{name}": dict(widths=DETAIL_CONFIGS[f"latent-{name}"]["widths"], channels=32, space_to_depth=1, **start)
        for name, start in (("tiny", {}), ("small", {"start": FROM_MODEL}))
    },
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
        if start == FROM_MODEL:
            folder = model_folder(self.settings.model or DEFAULT_AUTOENCODER) / LATENT_FOLDER
        else:
            folder = resolve_folder(start)
        detail = DetailDecoder.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False)
        return EndToEndDecoder.from_detail_decoder(detail.float())

    def wrap(self, model: EndToEndDecoder) -> torch.nn.Module:
        return AsDetailDecoder(model)

    def validate(self, model: EndToEndDecoder) -> dict:
        return super().validate(AsDetailDecoder(model))

    @classmethod
    def export(cls, settings, trained, metrics, folder) -> None:
        """The decoder's own folder; a latent one in LATENT_END_TO_END_FOLDER beside the vae/ and hfd/ of `--model`."""
        if not is_latent(settings.config):
            return super().export(settings, trained, metrics, folder)
        save_trained(cls.model_class, trained, settings.weights_dtype, folder / LATENT_END_TO_END_FOLDER)
        source = model_folder(settings.model or DEFAULT_AUTOENCODER)
        for part in ("vae", LATENT_FOLDER):
            copy_weights(source / part, folder / part)
