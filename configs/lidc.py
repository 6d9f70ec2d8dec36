r"""LIDC-IDRI, the ProSona paper's setting (1,609 slices, 4 radiologists, 128x128).

Run (data path from the config, e.g. D-Persona's `lidc_attributes.pkl`):

  python -m prosona_jax.main --config=configs/lidc.py:fold=0 --workdir=runs/lidc \
      --config.data.path=/data/lidc_attributes.pkl

`fold=-1` runs the four folds in turn. The paper trains 100 epochs per stage with Adam,
lr 1e-4, batch 8; D-Persona's choices (batch 12, cosine schedule, posterior on all masks,
unscaled scores, 100/500 samples) are the `dpersona` variant: `configs/lidc.py:dpersona`.
"""

from prosona_jax import config_defaults
from prosona_jax import config_lib
from prosona_jax import prompt_bank


def get_config(arg: str | None = None):
  """Args: `fold=K` (-1: all four), `dpersona`, or both (e.g. `fold=2,dpersona`)."""
  arg = config_lib.parse_arg(arg, config="configs/lidc.py", fold=0, dpersona=False)
  c = config_defaults.base_config()
  c.data.format = "lidc_attributes"  # D-Persona's 1,609-slice pickle; `lidc_crops` also works.
  c.data.path = "data/lidc_attributes.pkl"  # Override with --config.data.path=...
  c.data.image_size = 128
  c.data.num_raters = 4
  c.data.rater_names = ("radiologist1", "radiologist2", "radiologist3", "radiologist4")
  c.data.order_raters_by_area = True  # LIDC raters are not identities: sort by area.
  c.data.fold = arg.fold
  c.model.backbone = "resnet34"
  c.text.kind = "clip"
  c.text.model = "openai/clip-vit-base-patch32"
  c.text.prompts.train = prompt_bank.LIDC_PROMPTS["train"]
  c.text.prompts.heldout = prompt_bank.LIDC_PROMPTS["heldout"]
  if arg.dpersona:
    c.data.batch_size = 12
    c.stage1.schedule = "cosine"
    c.stage2.schedule = "cosine"
    c.model.posterior_input = "all"
    c.stage1.seg_latent = "prior"
    c.stage1.bound_form = "dpersona"
    c.stage2.scale_scores = False
    c.stage2.num_samples = 100
    c.stage2.eval_num_samples = 500
  return c
