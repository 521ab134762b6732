"""The built-in latent diffusion model (builtin:ldm-small): its networks and how `diffarc train` trains them."""
