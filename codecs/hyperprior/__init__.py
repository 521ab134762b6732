"""The mean-scale hyperprior codec (Ballé 2018 / Minnen 2018): codec.py the codec, nets.py its transforms, task.py their training."""
