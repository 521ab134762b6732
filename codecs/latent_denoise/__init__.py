"""Foundation latent denoising (seed 001): codec.py the codec, nets.py its trained predictors, task.py their training."""
