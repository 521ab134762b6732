"""Where hfd's decode time goes, per Kodak image on the CPU: the whole decode, and each part of it.

    python benchmarks/hfd_decode_time.py --threads 2                              # the default model
    python benchmarks/hfd_decode_time.py --threads 2 --model builtin:hfd-small    # the pixel decoder

For each image: one full `decode` of an hfd stream (quality 20, the codec's default steps), then its parts
timed alone on the same picture: the AVIF base's decode, and for a latent decoder taef2's encoder pass, one
flow-network call at latent resolution, taef2's decoder pass; for a pixel decoder one network call. Each
figure is the best of `--repeat` runs (the machine is shared; the best is the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffarc.codecs import container
from diffarc.codecs.hfd.detail import LatentDetail
from diffarc.codecs.parts.latents import decode_latents, encode_latents
from diffarc.codecs.registry import create_codec
from diffarc.pipeline.images import load_rgb

SHARED = Path(__file__).resolve().parents[2] / "shared"


def best(function, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="hfd's model (default: the codec's)")
    parser.add_argument("--kodak", default=str(SHARED / "data" / "kodak"))
    parser.add_argument("--limit", type=int, default=4, help="the first N images")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    codec = create_codec("hfd", {"model": args.model, "quality": 20})
    rows = []
    for path in sorted(Path(args.kodak).glob("*.png"))[: args.limit]:
        image = load_rgb(path.read_bytes())
        [stream] = codec.encode([image])
        header, payload = container.unpack(stream)
        row = {"image": path.stem, "decode_s": best(lambda: codec.decode([stream]), args.repeat)}
        row["avif_s"] = best(lambda: codec.base_picture(payload, header), args.repeat)
        base = codec.base_picture(payload, header)
        height, width = codec._padded(*base.shape[2:])
        x = torch.nn.functional.pad(base, (0, width - base.shape[3], 0, height - base.shape[2]), mode="replicate")
        network = codec.decoder.network
        with torch.inference_mode():
            if isinstance(codec.decoder, LatentDetail):
                autoencoder = codec.decoder.autoencoder
                row["taef2_encode_s"] = best(lambda: encode_latents(autoencoder, x), args.repeat)
                latent = encode_latents(autoencoder, x)
                row["taef2_decode_s"] = best(lambda: decode_latents(autoencoder, latent), args.repeat)
                x = latent
            q, s, t = (torch.tensor([20.0]), torch.tensor([1.0]), torch.ones(1))
            row["network_call_s"] = best(lambda: network(torch.zeros_like(x), x, q, s, t), args.repeat)
        rows.append(row)
        print(json.dumps(row), flush=True)
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "image"}
    print(json.dumps({"mean": means, "threads": args.threads, "steps": codec.config["steps"], "model": args.model or "default"}))


if __name__ == "__main__":
    main()
