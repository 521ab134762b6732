"""DDCM: Denoising Diffusion Codebook Models (Ohayon, Manor, Michaeli, Elad, ICML 2025; seed 002).

A pretrained latent diffusion model becomes a codec with no training. Sampling runs the reverse
process from a fixed seeded x_T; at every step, instead of fresh Gaussian noise, the encoder picks the
codebook entry that best points from the model's current estimate x̂0 towards the true latent x0. The
picks are the bitstream; the decoder replays the same steps with the same picks.

    image ─VAE─► x0          x_T (seeded, not coded)
                  │           │  for each step t (T steps; the last adds no noise):
                  │           ├─► UNet ─► x̂0, ε̂ ─► mean = DDIM_η=1(x̂0, ε̂)
                  └─ r = x0 − x̂0 ─► pick z from codebook(seed, t) ─► x_{t−1} = mean + σ_t·z
                                      └─► indices ─► bitstream
    decoder: same loop, z = the recorded entries; output x̂0 at t = 0 ─VAE─► image

Choices the paper leaves open, made here:
- Codebooks come from `noise.gaussian`, a counter-based generator keyed by (seed, step, entry): the same
  numbers on CPU and GPU, and the decoder generates only the chosen entries (O(latent size) per step).
- Tiles (`tile`, latent pixels): one codebook of K tile-sized entries per step, shared by every tile of
  the latent, each tile picking its own entry. The noise is still i.i.d. Gaussian — this is DDCM with a
  product codebook of K^tiles entries, of which the per-tile argmax finds the best exactly. It makes
  the rate proportional to the image area (bpp roughly independent of size) and the encoder's codebook
  cost K·tile² per step instead of K·latent size. `tile=0` is the paper's setting: one entry for the
  whole latent.
- Selection: `argmax` (the paper, one atom); `mp`, matching pursuit with `atoms` M and `coef_bits` C:
  each extra round mixes in √(1−c)·z_k with the current noise scaled by √c, c ∈ {1/2^C … (2^C−1)/2^C},
  renormalised, and code 0 means "stop" (so C ≥ 1 always buys a real choice; C ≥ 2 is advised);
  `turbo` (Turbo-DDCM): the M entries with the largest |⟨z, r⟩|, each with its sign, summed and scaled
  by 1/√M, coded as a combination index plus M sign bits.
- Schedule: `steps` timesteps evenly spaced from the model's last training step down to 0 (linspace),
  DDPM posterior noise (DDIM with η = 1); the last step adds no noise, so steps − 1 carry indices.
- Images of any size are edge-padded to what the VAE and UNet need (and to whole tiles), then cropped.
- `colour=affine` (the default): the encoder fits a colour transform from the picture of the final latent
  (which it has) to the original and appends it (24 bytes, parts/colour.py): the autoencoder turns hues.

Rate: bits = (steps − 1) · tiles · b, tiles = ⌈h/t⌉·⌈w/t⌉ for the padded latent h×w and tile side t
(1 tile when t = 0), with b = log2 K (argmax), log2 K + (M − 1)(log2 K + C) (mp), or
⌈log2 C(K, M)⌉ + M (turbo). bpp = 8·(⌈bits/8⌉ + 24 + container header bytes) / (H·W), the 24 bytes
being the colour transform (`colour=affine`, the default; parts/colour.py) that follows the bits.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from .base import Codec, DecodeCost, Param
from .parts.colour import COLOUR_PARAM, apply_colour, fit_colour, split_colour
from .parts.bitpack import BitReader, BitWriter, combination_bits, rank_combination, unrank_combination
from .container import Header
from .errors import BitstreamError, ModelError, ParameterError
from .parts.latents import VAE_DOWNSAMPLING, decode_latents, encode_latents, images_to_tensor, latent_size, tensor_to_images
from .parts.models import DEFAULT_MODEL, MODEL_PARAM_HELP, PRECISIONS, UNET_PARAM_HELP, builtin_model_weights, load_model
from .parts.noise import gaussian
from .parts.denoisers import DiffusionDenoiser
from .parts.samplers import codebook_ddpm, linspace_schedule

INITIAL_NOISE_STEP = 0xFFFFFFFF  # x_T is entry 0 of a codebook no sampling step uses
MAX_CODEBOOK_VALUES = 1 << 28  # values of one step's codebook, which the encoder draws whole: 1 GiB of float32
NOISE_FIELD_SIDE = 65535  # parts/noise.py: sites per side of the noise field
# Decoding cost (base.DecodeCost), measured with builtin:ldm-small on one CPU thread: a noise draw made
# on its own (mp, turbo: one tile at a time; ~0.8 ms, mostly per-call overhead) costs about a UNet pass
# over DRAW_PIXELS image pixels; unranking a turbo combination of M of K entries at most about
# M³·log2 K / UNRANK_PER_DRAW such draws (0.8 s for M = 512, K = 65536).
DRAW_PIXELS = 1024
UNRANK_PER_DRAW = 1 << 21


class DdcmCodec(Codec):
    name = "ddcm"
    description = "Denoising Diffusion Codebook Models: codebook-selected noise in reverse diffusion (ICML 2025)."
    params = (
        Param("model", str, DEFAULT_MODEL, MODEL_PARAM_HELP, location=True),
        Param("unet", str, "", UNET_PARAM_HELP, location=True),
        Param("steps", int, 20, "reverse-diffusion steps T (T − 1 carry indices)", minimum=2, maximum=1000),
        Param("codebook", int, 256, "codebook size K, a power of two", minimum=2, maximum=1 << 16),
        Param("atoms", int, 1, "noise vectors per step and tile, M (mp, turbo)", minimum=1, maximum=512),
        Param("coef_bits", int, 2, "coefficient bits C per extra atom (mp)", minimum=1, maximum=8),
        Param("selection", str, "argmax", "how noise is picked", choices=("argmax", "mp", "turbo")),
        Param("tile", int, 8, "latent tile side sharing one codebook; 0: whole latent (paper)", minimum=0, maximum=256),
        Param("seed", int, 0, "seed of x_T and of the codebooks", minimum=0, maximum=0xFFFFFFFF),
        COLOUR_PARAM,
        Param("precision", str, "fp32", "UNet and VAE arithmetic", choices=tuple(PRECISIONS), build_time=True),
    )
    presets = {
        # Named by approximate bpp on Kodak (768×512: 96 tiles of 8 latent px = 64×64 image px):
        # 11·96·8 = 8448 bits; 24·96·10 = 23040 bits; 19·96·(⌈log2 C(1024, 2)⌉ + 2) = 38304 bits.
        "0.02bpp": {"steps": 12, "codebook": 256, "tile": 8},
        "0.05bpp": {"steps": 25, "codebook": 1024, "tile": 8},
        "0.1bpp": {"steps": 20, "codebook": 1024, "tile": 8, "selection": "turbo", "atoms": 2},
    }

    def __init__(self, device: str = "cpu", **params):
        super().__init__(device, **params)
        self.model = load_model(self.config["model"], device, PRECISIONS[self.config["precision"]], self.config["unet"])
        if self.model.unet is None:
            raise ModelError(f"model {self.config['model']} has no diffusion UNet; ddcm needs one")

    @classmethod
    def check_config(cls, config: dict) -> None:
        if config["codebook"] & (config["codebook"] - 1):
            raise ParameterError(f"ddcm codebook size must be a power of two, got {config['codebook']}")
        if config["selection"] == "turbo" and config["atoms"] > config["codebook"]:
            raise ParameterError("ddcm turbo needs atoms <= codebook")

    @classmethod
    def builtin_weights(cls) -> dict:
        return builtin_model_weights()

    @property
    def fingerprint(self) -> bytes:
        return self.model.fingerprint

    def weights_folders(self) -> dict:
        return self.model.weights_folders()

    # ------------------------------------------------------------------ geometry and rate

    def latent_shape(self, height: int, width: int, config: dict) -> tuple[int, int, int]:
        return latent_size(self.model, height, width, config["tile"] or 1)

    @staticmethod
    def tile_grid(latent: tuple[int, int, int], tile: int) -> tuple[int, int, int]:
        """(tiles down, tiles across, tile side) of a latent."""
        if tile == 0:
            return 1, 1, 0
        return latent[1] // tile, latent[2] // tile, tile

    @staticmethod
    def bits_per_tile(config: dict) -> int:
        k_bits = int(math.log2(config["codebook"]))
        atoms = config["atoms"]
        if config["selection"] == "turbo":
            return combination_bits(config["codebook"], atoms) + atoms
        if config["selection"] == "mp":
            return k_bits + (atoms - 1) * (k_bits + config["coef_bits"])
        return k_bits

    def payload_bits(self, height: int, width: int, config: dict) -> int:
        down, across, _ = self.tile_grid(self.latent_shape(height, width, config), config["tile"])
        return (config["steps"] - 1) * down * across * self.bits_per_tile(config)

    @staticmethod
    def check_geometry(latent: tuple[int, int, int], config: dict) -> None:
        """Refuse (ParameterError) a latent no encoder codes with these settings: one whose step codebook,
        drawn whole by the encoder, holds more than MAX_CODEBOOK_VALUES values (tile=0 on a large image),
        or one wider than the noise field."""
        channels, height, width = latent
        tile = config["tile"]
        values = channels * (tile * tile if tile else height * width)
        if config["codebook"] * values > MAX_CODEBOOK_VALUES:
            raise ParameterError(
                f"ddcm with codebook {config['codebook']} and tile {tile} draws {config['codebook']}×{values} "
                f"codebook values per step for a {height}×{width} latent, over {MAX_CODEBOOK_VALUES}: use tiles "
                "(tile=8) or a smaller codebook"
            )
        if max(height, width) > NOISE_FIELD_SIDE:
            raise ParameterError(f"ddcm latents are limited to {NOISE_FIELD_SIDE} per side, got {height}×{width}")

    def decode_cost(self, header: Header, payload: bytes) -> DecodeCost:
        """UNet steps and the VAE over the padded image, plus the replay's noise draws made one tile at a
        time (mp, turbo), after checking that an encoder can have written the stream and its length."""
        config = self.stream_config(header)
        latent = self.latent_shape(header.height, header.width, config)
        try:
            self.check_geometry(latent, config)
        except ParameterError as exc:
            raise BitstreamError(f"no ddcm encoder writes this stream: {exc}") from None
        self.checked_payload_bits(split_colour(payload, config, self.name)[0], header, config)
        down, across, _ = self.tile_grid(latent, config["tile"])
        pixels = latent[1] * latent[2] * VAE_DOWNSAMPLING**2
        draws = (config["steps"] - 1) * down * across * self.replay_draws(config)
        return DecodeCost(pixels, config["steps"] + 1 + math.ceil(draws * DRAW_PIXELS / pixels))

    @staticmethod
    def replay_draws(config: dict) -> int:
        """The decoder's work per tile and step beyond the vectorised argmax draw, in noise draws of one
        tile (mp: one per atom; turbo: one, and unranking the combination, which grows as M³·log2 K)."""
        if config["selection"] == "mp":
            return config["atoms"]
        if config["selection"] == "turbo":
            return 1 + math.ceil(config["atoms"] ** 3 * math.log2(config["codebook"]) / UNRANK_PER_DRAW)
        return 0

    def checked_payload_bits(self, payload: bytes, header: Header, config: dict) -> int:
        """The bits the stream's parameters and size need, after checking the payload holds exactly that many bytes."""
        bits = self.payload_bits(header.height, header.width, config)
        if len(payload) != -(-bits // 8):
            raise BitstreamError(f"ddcm payload is {len(payload)} bytes; its parameters need {-(-bits // 8)}")
        return bits

    # ------------------------------------------------------------------ encode

    def encode_payloads(self, images: list[np.ndarray]) -> list[bytes]:
        groups = defaultdict(list)  # images that pad to the same latent run as one batch
        for index, image in enumerate(images):
            groups[self.latent_shape(*image.shape[:2], self.config)].append(index)
        for latent in groups:
            self.check_geometry(latent, self.config)
        payloads: list[bytes] = [b""] * len(images)
        dtype = PRECISIONS[self.config["precision"]]
        for latent, indices in groups.items():
            group_payloads, final = self.encode_group([images[i] for i in indices], latent)
            if self.config["colour"] == "affine":  # fitted to the picture of the latent the decoder replays
                with torch.inference_mode():
                    pictures = tensor_to_images(decode_latents(self.model, final.to(dtype)), [images[i].shape[:2] for i in indices])
                group_payloads = [p + fit_colour(images[i], picture) for p, i, picture in zip(group_payloads, indices, pictures)]
            for index, payload in zip(indices, group_payloads):
                payloads[index] = payload
        return payloads

    @torch.inference_mode()
    def encode_group(self, images: list[np.ndarray], latent: tuple[int, int, int]) -> tuple[list[bytes], torch.Tensor]:
        """Payloads of same-latent-size images, and the final latents the decoder will reproduce."""
        config, dtype = self.config, PRECISIONS[self.config["precision"]]
        size = (latent[1] * VAE_DOWNSAMPLING, latent[2] * VAE_DOWNSAMPLING)
        target = encode_latents(self.model, images_to_tensor(images, size, self.device, dtype)).float()
        writers = [BitWriter() for _ in images]
        # The encoder's residual r = x0 − x̂0 picks the noise; the decoder replays the picks without it.
        final = self._sample(
            len(images), latent, config, lambda step, x0_hat: self._choose(step, target - x0_hat, latent, writers)
        )
        return [w.getvalue() for w in writers], final

    def _choose(self, step: int, residual: torch.Tensor, latent, writers: list[BitWriter]) -> torch.Tensor:
        """Pick each tile's noise for this step, record the picks, return the noise (B, C, H, W)."""
        config = self.config
        tiles = to_tiles(residual, config["tile"])  # (B, N, D)
        book = codebook(config, step, latent, self.device)  # (K, D)
        scores = tiles @ book.T  # one matrix product scores every tile of every image
        selection = config["selection"]
        if selection == "turbo":
            noise, records = self._turbo(scores, book)
        elif selection == "mp":
            noise, records = self._matching_pursuit(tiles, scores, book)
        else:
            best = scores.argmax(dim=-1)
            noise = book[best]
            k_bits = int(math.log2(config["codebook"]))
            records = [[[(int(k), k_bits)] for k in row] for row in best.tolist()]
        for writer, image_records in zip(writers, records):
            for tile_records in image_records:
                for number, bits in tile_records:
                    writer.write(number, bits)
        return from_tiles(noise, latent, residual.shape[0], config["tile"])

    def _turbo(self, scores: torch.Tensor, book: torch.Tensor):
        atoms, size = self.config["atoms"], self.config["codebook"]
        top = scores.abs().topk(atoms, dim=-1).indices  # (B, N, M)
        signs = torch.gather(scores, -1, top).sign()
        signs[signs == 0] = 1
        noise = (book[top] * signs.unsqueeze(-1)).sum(dim=-2) / math.sqrt(atoms)
        c_bits = combination_bits(size, atoms)
        records = []
        for image_top, image_signs in zip(top.tolist(), signs.tolist()):
            image_records = []
            for entries, tile_signs in zip(image_top, image_signs):
                order = sorted(range(atoms), key=lambda i: entries[i])
                sign_bits = sum((1 << i) for i, j in enumerate(order) if tile_signs[j] < 0)
                image_records.append([(rank_combination(entries), c_bits), (sign_bits, atoms)])
            records.append(image_records)
        return noise, records

    def _matching_pursuit(self, tiles: torch.Tensor, scores: torch.Tensor, book: torch.Tensor):
        config = self.config
        k_bits, c_bits = int(math.log2(config["codebook"])), config["coef_bits"]
        coefficients = mp_coefficients(c_bits, tiles.device)  # (Q,), code q+1
        target_norm = math.sqrt(book.shape[1])
        best = scores.argmax(dim=-1)
        current = book[best]  # (B, N, D)
        records = [[[(int(k), k_bits)] for k in row] for row in best.tolist()]
        active = torch.ones(best.shape, dtype=torch.bool, device=tiles.device)
        book_norm2 = (book * book).sum(-1)  # (K,)
        for _ in range(config["atoms"] - 1):
            cur_r = (current * tiles).sum(-1, keepdim=True)  # (B, N, 1)
            cur_norm2 = (current * current).sum(-1, keepdim=True)
            cross = current @ book.T  # (B, N, K)
            c = coefficients.view(-1, 1, 1, 1)  # (Q, 1, 1, 1)
            dots = c.sqrt() * cur_r + (1 - c).sqrt() * scores  # (Q, B, N, K)
            norms = (c * cur_norm2 + (1 - c) * book_norm2 + 2 * (c * (1 - c)).sqrt() * cross).clamp_min(1e-12).sqrt()
            gains = dots / norms
            flat = gains.permute(1, 2, 0, 3).reshape(*best.shape, -1)  # (B, N, Q·K)
            value, arg = flat.max(dim=-1)
            improves = active & (value > cur_r.squeeze(-1) / cur_norm2.squeeze(-1).sqrt())
            q, k = arg // config["codebook"], arg % config["codebook"]
            cq = coefficients[q].unsqueeze(-1)
            mixed = cq.sqrt() * current + (1 - cq).sqrt() * book[k]
            mixed = mixed * (target_norm / mixed.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            current = torch.where(improves.unsqueeze(-1), mixed, current)
            for b, row in enumerate(records):
                for n, tile_records in enumerate(row):
                    if improves[b, n]:
                        tile_records.append((int(k[b, n]), k_bits))
                        tile_records.append((int(q[b, n]) + 1, c_bits))
                    else:  # code 0: stop; k is written as 0 to keep every stream the same length
                        tile_records.append((0, k_bits))
                        tile_records.append((0, c_bits))
            active = improves
        return current, records

    # ------------------------------------------------------------------ decode

    def decode_payloads(self, payloads: list[bytes], headers: list[Header]) -> list[np.ndarray]:
        return [self._decode_one(payload, header) for payload, header in zip(payloads, headers)]

    @torch.inference_mode()
    def _decode_one(self, payload: bytes, header: Header) -> np.ndarray:
        config = self.stream_config(header)
        payload, colour = split_colour(payload, config, self.name)
        pixels = decode_latents(self.model, self.decode_latent(payload, header).to(PRECISIONS[config["precision"]]))
        image = tensor_to_images(pixels, [(header.height, header.width)])[0]
        return image if colour is None else apply_colour(image, colour)

    @torch.inference_mode()
    def decode_latent(self, payload: bytes, header: Header) -> torch.Tensor:
        """Replay the recorded choices: the final latent (1, C, h, w) of the padded image. `payload` is the
        choices' bits, without the colour transform (split_colour)."""
        config = self.stream_config(header)
        latent = self.latent_shape(header.height, header.width, config)
        reader = BitReader(payload, self.checked_payload_bits(payload, header, config))
        return self._sample(1, latent, config, lambda step, _: self._replay(step, reader, latent, config))

    def _replay(self, step: int, reader: BitReader, latent, config: dict) -> torch.Tensor:
        down, across, tile = self.tile_grid(latent, config["tile"])
        shape = (latent[0], tile, tile) if tile else latent
        k_bits = int(math.log2(config["codebook"]))
        if config["selection"] == "argmax":  # one entry per tile: generate them all in one call
            entries = [reader.read(k_bits) for _ in range(down * across)]
            noise = gaussian(config["seed"], step, entries, shape, self.device).flatten(1)
            return from_tiles(noise.unsqueeze(0), latent, 1, config["tile"])
        noises = []
        for _ in range(down * across):
            if config["selection"] == "turbo":
                atoms = config["atoms"]
                rank = reader.read(combination_bits(config["codebook"], atoms))
                try:
                    entries = unrank_combination(rank, config["codebook"], atoms)
                except ValueError as exc:  # the field is wider than C(K, M) needs: a damaged stream
                    raise BitstreamError(f"ddcm payload: {exc}") from None
                sign_bits = reader.read(atoms)
                signs = torch.tensor([-1.0 if sign_bits >> i & 1 else 1.0 for i in range(atoms)], device=self.device)
                z = gaussian(config["seed"], step, entries, shape, self.device).flatten(1)
                noises.append((z * signs.unsqueeze(-1)).sum(0) / math.sqrt(atoms))
            else:
                current = gaussian(config["seed"], step, [reader.read(k_bits)], shape, self.device).flatten()
                for _ in range(config["atoms"] - 1 if config["selection"] == "mp" else 0):
                    k, q = reader.read(k_bits), reader.read(config["coef_bits"])
                    if q == 0:
                        continue
                    c = float(mp_coefficients(config["coef_bits"], "cpu")[q - 1])
                    z = gaussian(config["seed"], step, [k], shape, self.device).flatten()
                    current = math.sqrt(c) * current + math.sqrt(1 - c) * z
                    current = current * (math.sqrt(current.numel()) / current.norm().clamp_min(1e-12))
                noises.append(current)
        return from_tiles(torch.stack(noises).unsqueeze(0), latent, 1, config["tile"])

    # ------------------------------------------------------------------ the shared sampling loop

    def _sample(self, batch: int, latent, config: dict, pick_noise) -> torch.Tensor:
        """The reverse process from the seeded x_T, `pick_noise(step, x0_hat)` supplying each step's noise."""
        denoiser = DiffusionDenoiser.from_model(self.model, PRECISIONS[config["precision"]])
        schedule = linspace_schedule(denoiser.alphas_cumprod, config["steps"])
        x = gaussian(config["seed"], INITIAL_NOISE_STEP, [0], latent, self.device).expand(batch, *latent)
        return codebook_ddpm(denoiser, x, schedule, pick_noise)


def codebook(config: dict, step: int, latent: tuple[int, int, int], device) -> torch.Tensor:
    """All K entries of a step's codebook, flattened: (K, D)."""
    tile = config["tile"]
    shape = (latent[0], tile, tile) if tile else latent
    return gaussian(config["seed"], step, torch.arange(config["codebook"]), shape, device).flatten(1)


def mp_coefficients(bits: int, device) -> torch.Tensor:
    """c values for codes 1 … 2^C − 1 (code 0 is "stop"): (q)/(2^C) for q = 1 … 2^C − 1."""
    return torch.arange(1, 2**bits, device=device, dtype=torch.float32) / 2**bits


def to_tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(B, C, H, W) → (B, N, C·t·t), tiles in row-major order; tile 0: the whole latent is one tile."""
    if tile == 0:
        return x.flatten(1).unsqueeze(1)
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // tile, tile, w // tile, tile).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // tile) * (w // tile), c * tile * tile)


def from_tiles(tiles: torch.Tensor, latent: tuple[int, int, int], batch: int, tile: int) -> torch.Tensor:
    c, h, w = latent
    if tile == 0:
        return tiles.reshape(batch, c, h, w)
    x = tiles.reshape(batch, h // tile, w // tile, c, tile, tile).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(batch, c, h, w)
