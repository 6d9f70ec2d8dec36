"""ProSona in JAX/Flax: prompt-guided personalization for multi-rater segmentation."""

__version__ = "0.1.0"
