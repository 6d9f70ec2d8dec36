"""ProSona in JAX/Flax: prompt-guided personalization for multi-rater segmentation."""

from prosona_jax import xla_flags as _xla_flags

__version__ = "0.1.0"

# CPU runs get the XLA flags measured faster on CPU (`xla_flags.CPU_DEFAULTS`), unless the
# user set those flags, or PROSONA_XLA_DEFAULTS=0. No effect once a JAX backend started.
_xla_flags.set_cpu_defaults()
