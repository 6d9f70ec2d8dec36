r"""Prostate MRI in the paper's setting, on the multi-rater folder format.

The paper's set is in-house (4,817 slices, four institution styles); bring yours as
`<root>/<case>/image.nii.gz` + `<root>/<case>/<institution>.nii.gz`:

  python -m prosona_jax.main --config=configs/prostate.py --workdir=runs/prostate \
      --config.data.path=/data/prostate_folders
"""

from prosona_jax import config_defaults
from prosona_jax import config_lib
from prosona_jax import prompt_bank


def get_config(arg: str | None = None):
  """Args: `fold=K` selects the test fold (-1: all four)."""
  arg = config_lib.parse_arg(arg, config="configs/prostate.py", fold=0)
  c = config_defaults.base_config()
  c.data.fold = arg.fold
  c.data.format = "folder"
  c.data.path = "data/prostate"  # Override with --config.data.path=...
  c.data.image_size = 128
  c.data.num_raters = 4
  # One rater per institution: real identities, so identity order.
  c.data.rater_names = ("institution1", "institution2", "institution3", "institution4")
  c.data.order_raters_by_area = False
  c.data.folder.skip_empty_slices = True
  c.model.backbone = "resnet34"
  c.text.prompts.train = prompt_bank.PROSTATE_PROMPTS["train"]
  c.text.prompts.heldout = prompt_bank.PROSTATE_PROMPTS["heldout"]
  return c
