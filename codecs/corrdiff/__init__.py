"""CorrDiff: HFD's detail decoder corrected by an end-to-end MSE decoder (codec.py, correction.py, nets.py, task.py)."""
