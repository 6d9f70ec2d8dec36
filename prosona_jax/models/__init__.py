"""Flax modules: backbones, Probabilistic U-Net parts, prompt projector, text encoders."""
