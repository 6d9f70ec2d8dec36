r"""A tiny configuration for tests and smoke runs: seconds on a CPU, meaningless numbers.

  python -m prosona_jax.main --config=configs/tiny.py --workdir=/tmp/tiny

The demo (`configs/demo.py`) shrunk: same data kind and text bank, a model of a few
thousand parameters, two epochs per stage and a random tiny text encoder.
"""

from prosona_jax import config_lib


def get_config(arg: str | None = None):
  """Args: `stage1` trains Stage 1 only."""
  arg = config_lib.parse_arg(arg, config="configs/tiny.py", stage1=False)
  c = config_lib.base_of(__file__, "demo.py")
  c.data.image_size = 32
  c.data.synthetic.num_images = 48
  c.data.synthetic.num_patients = 16
  c.data.eval_batch_size = 8
  c.data.augment_rotate = False  # Keep test steps cheap; flips still exercise augmentation.
  c.model.unet_filters = (4, 8)
  c.model.feature_channels = 4
  c.model.gaussian_filters = (4, 8)
  c.model.convs_per_block = 1
  c.model.unet_batch_norm = False
  c.stage1.epochs = 2
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
  for name in ("unet", "cm_global", "cm_pixel", "pionono", "dpersona", "tab"):
    c[name].epochs = 2
    c[name].checkpoint_every = 4
    c[name].log_every = 2
    c[name].eval_every_epochs = 1
  c.pionono.test_samples = 4
  c.dpersona.train_samples = 4
  c.dpersona.test_samples = 4
  c.text.kind = "tiny_bert"
  c.text.model = ""
  if arg.stage1:
    c.stages = ("stage1",)
  return c
