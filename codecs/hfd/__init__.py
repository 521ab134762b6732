"""HFD: a base codec plus a conditional diffusion / rectified-flow detail decoder (codec.py, nets.py, task.py)."""
