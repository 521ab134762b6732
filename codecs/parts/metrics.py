"""Image-quality metrics shared by the `verify` and `bench` jobs and by latent-denoise's timestep search.

Every metric takes two numpy uint8 arrays of shape (H, W, 3), RGB, of the same shape, the original
first, and returns a Python float.

- `psnr`: peak signal-to-noise ratio in dB, one MSE over all pixels and all three channels, peak 255;
  `math.inf` for identical images.
- `ms_ssim`: multi-scale SSIM (Wang, Simoncelli & Bovik, Asilomar 2003) on [0, 255] data, computed per
  channel and then averaged over the three channels. See its docstring for small images.
- `LPIPS`: LPIPS v0.1 (Zhang et al., CVPR 2018) with the SqueezeNet-1.1 backbone, "LPIPS-squeeze";
  0 for identical images, larger is worse. Weights come from one safetensors file, never from pickle
  and never from the network; `find_lpips_weights` says where that file is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

LPIPS_WEIGHTS_ENV = "DIFFARC_LPIPS_WEIGHTS"

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WINDOW, _SIGMA, _K1, _K2, _PEAK = 11, 1.5, 0.01, 0.03, 255.0


def _check_pair(reference: np.ndarray, reconstruction: np.ndarray) -> None:
    if reference.shape != reconstruction.shape:
        raise ValueError(
            f"images differ in shape: reference {reference.shape}, reconstruction {reconstruction.shape}"
        )
    if reference.ndim != 3 or reference.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB arrays, got shape {reference.shape}")
    if reference.dtype != np.uint8 or reconstruction.dtype != np.uint8:
        raise ValueError(f"expected uint8 arrays, got {reference.dtype} and {reconstruction.dtype}")


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """RGB PSNR in dB (one MSE over all channels, peak 255); `math.inf` when the images are identical."""
    _check_pair(reference, reconstruction)
    mse = np.mean((reference.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
    if mse == 0:
        return math.inf
    return float(10.0 * math.log10(_PEAK**2 / mse))


def _gaussian(size: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * _SIGMA**2))
    return g / g.sum()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean SSIM and mean contrast-structure term per channel, 'valid' filtering; x, y: (3, 1, H, W)."""
    size = g.numel()
    # The separable window over each of the 15 planes (five moments of three channels) alone: over all of
    # them in one call the convolution unfolds its input, 550 MB and twice the time for a Kodak image on one
    # thread, which made a verify --against worker's peak twice decode's.
    moments = torch.cat([x, y, x * x, y * y, x * y]).split(1)
    moments = torch.cat([F.conv2d(F.conv2d(plane, g.view(1, 1, 1, size)), g.view(1, 1, size, 1)) for plane in moments])
    mu_x, mu_y, xx, yy, xy = moments.chunk(5)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y

    c1, c2 = (_K1 * _PEAK) ** 2, (_K2 * _PEAK) ** 2
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    return (luminance * cs).mean(dim=(1, 2, 3)), cs.mean(dim=(1, 2, 3))


def ms_ssim(reference: np.ndarray, reconstruction: np.ndarray) -> float:
    """MS-SSIM of two RGB images, in [0, 1]; 1 for identical images.

    The standard configuration: data range 255, Gaussian window 11 with sigma 1.5, K1 = 0.01,
    K2 = 0.03, five scales weighted (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average pooling
    between scales (an odd last row or column is dropped), 'valid' filtering (no padding). It is
    computed on each of R, G, B separately and the three values are averaged. Negative per-scale
    values are clamped to 0 before the power, as common implementations do, so the result is never NaN.

    Small images, our choices (the paper assumes images large enough for five scales):
    - five scales need the window to fit at the coarsest scale, i.e. a shorter side of at least
      11 * 2**4 = 176 px. A smaller image uses as many scales as fit (scale s needs side // 2**s >= 11),
      the first ones, with their weights renormalised to sum to 1.
    - an image whose shorter side is below 11 px uses one scale and a window shrunk to that side
      (same sigma, truncated), so a 1-px strip still gets a value.
    """
    _check_pair(reference, reconstruction)
    side = min(reference.shape[:2])
    window = min(_WINDOW, side)
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and side // 2**scales >= window:
        scales += 1
    weights = torch.tensor(MS_SSIM_WEIGHTS[:scales], dtype=torch.float32)
    weights = weights / weights.sum()

    # float32: var = E[x^2] - mu^2 loses up to ~65025·2^-24 ≈ 0.004 to cancellation, negligible next to
    # C2 = 58.5; values agree with a float64 computation to ~1e-6 at a fraction of the time.
    x = torch.tensor(reference, dtype=torch.float32).permute(2, 0, 1).unsqueeze(1)
    y = torch.tensor(reconstruction, dtype=torch.float32).permute(2, 0, 1).unsqueeze(1)
    g = _gaussian(window)
    per_scale = []
    for scale in range(scales):
        if scale > 0:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        ssim, cs = _ssim_terms(x, y, g)
        # The coarsest scale contributes the full SSIM, the finer ones only contrast-structure.
        per_scale.append(torch.relu(ssim if scale == scales - 1 else cs))
    per_channel = torch.prod(torch.stack(per_scale) ** weights.view(-1, 1), dim=0)
    return float(per_channel.mean())


class _Fire(nn.Module):
    def __init__(self, in_ch: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(in_ch, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(x)), F.relu(self.expand3x3(x))], dim=1)


def _squeezenet_features() -> nn.Sequential:
    """torchvision's `squeezenet1_1().features`, same indices so its state dict loads unchanged."""
    pool = lambda: nn.MaxPool2d(3, stride=2, ceil_mode=True)  # noqa: E731
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),
        _Fire(64, 16, 64), _Fire(128, 16, 64), pool(),
        _Fire(128, 32, 128), _Fire(256, 32, 128), pool(),
        _Fire(256, 48, 192), _Fire(384, 48, 192),
        _Fire(384, 64, 256), _Fire(512, 64, 256),
    )  # fmt: skip


# LPIPS-squeeze reads the features after these slices of `features`.
_TAP_ENDS = (2, 5, 8, 10, 11, 12, 13)
_TAP_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# Smallest side the backbone accepts: the stride-2 conv and three unpadded 3x3 max pools need it.
LPIPS_MIN_SIDE = 17


class _LinearHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # model.0 is the reference code's training-time dropout, an identity in eval mode; kept so
        # the keys read `lin{i}.model.1.weight` as in the published weights.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class _LPIPSNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = _squeezenet_features()
        for i, channels in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _LinearHead(channels))
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out, start = [], 0
        for end in _TAP_ENDS:
            x = self.features[start:end](x)
            out.append(x / (torch.sqrt((x * x).sum(dim=1, keepdim=True)) + 1e-10))
            start = end
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance, (N,), for (N, 3, H, W) inputs in [-1, 1]."""
        total = 0
        for i, (fx, fy) in enumerate(zip(self.taps(x), self.taps(y))):
            total = total + getattr(self, f"lin{i}")((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return total


class LPIPS:
    """LPIPS v0.1, SqueezeNet-1.1 backbone, float32, eval mode, from one safetensors file.

    The file holds `features.*` (torchvision's `squeezenet1_1().features` state dict) and the seven
    linear heads `lin0.model.1.weight` ... `lin6.model.1.weight`; extra keys are ignored.
    Images need a shorter side of at least `LPIPS_MIN_SIDE` pixels.
    """

    def __init__(self, weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
        self.weights_path = Path(weights_path)
        self.device = torch.device(device)
        net = _LPIPSNet()
        expected = {k for k in net.state_dict() if k not in ("shift", "scale")}
        state = load_file(str(self.weights_path))
        missing = sorted(expected - state.keys())
        if missing:
            raise ValueError(
                f"{self.weights_path} is not an LPIPS-squeeze weights file: it lacks {len(missing)} "
                f"expected key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        try:
            net.load_state_dict({k: state[k].float() for k in expected}, strict=False)
        except RuntimeError as e:  # shape mismatches
            raise ValueError(f"{self.weights_path} does not match LPIPS-squeeze: {e}") from e
        self.net = net.to(self.device).eval().requires_grad_(False)

    def _to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(images)).to(self.device)  # np.stack copies: writable
        return batch.permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def batch(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
        """LPIPS of each (reference, reconstruction) pair; pairs of one shape run as one batch."""
        for ref, rec in pairs:
            _check_pair(ref, rec)
            if min(ref.shape[:2]) < LPIPS_MIN_SIDE:
                raise ValueError(f"LPIPS needs a side of at least {LPIPS_MIN_SIDE} px, got {ref.shape[:2]}")
        if not pairs:
            return []
        if len({ref.shape for ref, _ in pairs}) > 1:
            return [v for pair in pairs for v in self.batch([pair])]
        with torch.inference_mode():
            x = self._to_tensor([ref for ref, _ in pairs])
            y = self._to_tensor([rec for _, rec in pairs])
            return [float(v) for v in self.net(x, y).cpu()]

    def __call__(self, reference: np.ndarray, reconstruction: np.ndarray) -> float:
        return self.batch([(reference, reconstruction)])[0]


def find_lpips_weights(explicit: str | os.PathLike | None = None) -> Path | None:
    """The LPIPS weights file: `explicit`, else `$DIFFARC_LPIPS_WEIGHTS`, else None.

    Either may name the file or a folder holding exactly one `*.safetensors`. A path that is given but
    does not exist raises FileNotFoundError: a typo must not silently skip the metric.
    """
    source = "explicit path"
    if explicit is None or str(explicit) == "":
        explicit, source = os.environ.get(LPIPS_WEIGHTS_ENV) or None, f"${LPIPS_WEIGHTS_ENV}"
        if explicit is None:
            return None
    path = Path(explicit).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"LPIPS weights not found: {path} (from {source})")
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"LPIPS weights folder {path} (from {source}) must hold exactly one *.safetensors file, "
                f"found {len(found)}"
            )
        return found[0]
    return path


def lpips_network(weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The LPIPS-squeeze network itself, frozen, for use as a differentiable training loss.

    Call it as `net(x, y)` on (N, 3, H, W) tensors in [-1, 1]; it returns the per-image distance (N,).
    Its own weights take no gradient, but gradients flow to the inputs.
    """
    return LPIPS(weights_path, device).net
