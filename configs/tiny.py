r"""A tiny configuration for tests and smoke runs: seconds on a CPU, meaningless numbers.

  python -m prosona_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from prosona_jax import config_defaults
from prosona_jax import prompt_bank


def get_config(arg: str | None = None):
  """Args: `stage1` trains Stage 1 only."""
  c = config_defaults.base_config()
  c.data.format = "synthetic"
  c.data.image_size = 32
  c.data.synthetic.num_images = 48
  c.data.synthetic.num_patients = 16
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.data.augment_rotate = False  # Keep test steps cheap; flips still exercise augmentation.
  c.model.backbone = "unet"
  c.model.unet_filters = (4, 8)
  c.model.feature_channels = 4
  c.model.gaussian_filters = (4, 8)
  c.model.convs_per_block = 1
  c.stage1.epochs = 2
  c.stage1.lr = 1e-3
  c.stage1.num_bound_samples = 3
  c.stage1.checkpoint_every = 4
  c.stage1.log_every = 2
  c.stage1.eval_every_epochs = 1
  c.stage2.epochs = 2
  c.stage2.lr = 1e-3
  c.stage2.num_samples = 4
  c.stage2.eval_num_samples = 4
  c.stage2.checkpoint_every = 4
  c.stage2.log_every = 2
  c.stage2.eval_every_epochs = 1
  c.eval.num_samples = 4
  c.text.kind = "tiny_bert"
  c.text.model = ""
  c.text.prompts.train = prompt_bank.SYNTHETIC_PROMPTS["train"]
  c.text.prompts.heldout = prompt_bank.SYNTHETIC_PROMPTS["heldout"]
  if arg == "stage1":
    c.stages = ("stage1",)
  elif arg:
    raise ValueError(f"configs/tiny.py: unknown argument {arg!r}; expected stage1")
  return c
