"""What codecs share, once: latent codecs, entropy coding, bit packing, noise, latents, samplers, denoisers, model loading, metrics, crops."""
