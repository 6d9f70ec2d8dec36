r"""Segments new images with a trained model: one mask per prompt, or Stage-1 samples.

  python -m prosona_jax.predict --model=models/lidc --input=scan.nii.gz \
      --prompt="include subtle regions" --prompt="conservative mask of the solid nodule core only" \
      --out=out/
  python -m prosona_jax.predict --workdir=runs/demo --key=synth3_slice3 --samples=8 --out=out/
  python -m prosona_jax.predict --model=models/demo --input=a.png \
      --interpolate="solid core only" \
      --interpolate="core plus faint surrounding zone, generous margin"

`--model` runs an export folder through its serialized functions; `--workdir` runs a
training run's checkpoints in-framework (and can read its dataset by `--key`). Without
`--prompt`, each rater's first phrasing in the bank is used. Bank phrasings need no text
encoder; other text is embedded with the model's (`config.text`).

Per input `<stem>` the output folder gets: `<stem>_probs.npy` (float32, (P,) + the input's
shape), one binary mask per prompt or sample in the input's format (`<stem>_prompt<j>` or
`<stem>_sample<j>`: `.npy` for npy inputs, `.png` for PNG and single-frame DICOM, `.nii.gz`
with the input's affine and header for NIfTI, `.npy` for multi-frame DICOM),
`<stem>_overlay.png`, with `--interpolate` `<stem>_interpolation.png` and `.npy`, and
`predictions.json` listing prompts, files and the preprocessing used. See `image_io.py`
for the accepted inputs and intensity normalisation.

Images larger than the model (a 512x512 CT slice, a 128x128 model) are predicted whole:
overlapping model-sized tiles (`--overlap`, default 0.25) blended with Gaussian weights,
as MONAI's sliding_window_inference does. `--roi=ROW,COL` predicts only the model-sized
region around that point, as LIDC models are trained (nodule-centred crops); outside it
the outputs are 0. `--resize=resample` rescales the slice to the model's size instead.
Smaller images are zero-padded, and the padding is cut off the outputs. What was done is
printed and recorded in predictions.json.
"""

from absl import flags

from prosona_jax import cli
from prosona_jax import image_io

_MODEL = flags.DEFINE_string("model", None, "Export folder (python -m prosona_jax.export).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training run (checkpoints) instead of --model.")
_CONFIG = cli.define_config_file("config", None,
                                          "With --workdir: overrides its config.json.")
_FOLD = flags.DEFINE_integer("fold", None, "With --workdir: which fold (default: the config's).")
_STAGE2_DIR = flags.DEFINE_string("stage2_dir", None,
                                  "With --workdir: another Stage-2 dir (e.g. a grid's).")
_CELL = flags.DEFINE_integer("cell", None, "With a grid's Stage-2 dir: the cell index.")
_INPUT = flags.DEFINE_multi_string("input", [], "Image file: .npy, .png, .nii/.nii.gz, DICOM.")
_KEY = flags.DEFINE_multi_string("key", [], "With --workdir: a record key of the run's dataset.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable); default: one per rater.")
_SAMPLES = flags.DEFINE_integer("samples", 0, "Draw N Stage-1 prior samples instead of prompts.")
_INTERPOLATE = flags.DEFINE_multi_string("interpolate", [],
                                         "Two prompts: writes the strip between them.")
_INTERPOLATE_STEPS = flags.DEFINE_integer("interpolate_steps", 7,
                                          "Points on the interpolation strip.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prior samples.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Slices per forward pass.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5,
                                "Probability above which a pixel is in the mask.")
_AXIS = flags.DEFINE_integer("axis", None, "Slicing axis of 3-D volumes (default: the config's).")
_NORMALIZE = flags.DEFINE_enum("normalize", "auto", image_io.NORMALIZE,
                               "Intensity normalisation.")
_RESIZE = flags.DEFINE_enum(
    "resize", "auto", image_io.RESIZE,
    "How slices reach the model's size: sliding_window (tiles over the whole image), "
    "resample (rescale), crop_or_pad (centre crop: the rest gets 0); auto: resample for "
    "models trained on resampled folder data, else sliding_window.")
_ROI = flags.DEFINE_list(
    "roi", None, "ROW,COL: predict only the model-sized region centred at that pixel; the "
    "rest gets 0. For a 3-D volume, three indices (one per axis of the array, in the "
    "file's order) also pick the one slice.")
_OVERLAP = flags.DEFINE_float("overlap", 0.25,
                              "Overlap of the sliding window's tiles, in [0, 1).")
_TEXT_ENCODER = flags.DEFINE_string(
    "text_encoder", "", "Text encoder folder/hub id for free text (default: the model's "
    "config); 'none' allows bank prompts only.")
_LIST_PROMPTS = flags.DEFINE_bool("list_prompts", False,
                                  "Print the model's bank phrasings and exit.")


def main(argv):
  del argv
  from prosona_jax import model_loader  # pylint: disable=g-import-not-at-top
  from prosona_jax import predictor  # pylint: disable=g-import-not-at-top
  from prosona_jax.inference import InferenceError  # pylint: disable=g-import-not-at-top

  if _LIST_PROMPTS.value:
    model = (model_loader.load_export(_MODEL.value) if _MODEL.value else
             model_loader.load_workdir(_WORKDIR.value, fold=_FOLD.value, config=_CONFIG.value,
                                       stage2_dir=_STAGE2_DIR.value, cell=_CELL.value)[0])
    if model.bank is None:
      raise InferenceError(f"{model.origin}: a Stage-1 model, without a prompt bank "
                           "(predict --samples=N draws its hypotheses)")
    for p, r, h in zip(model.bank.prompts, model.bank.rater, model.bank.heldout):
      print(f"rater {r}{' (held out)' if h else ''}: {p}")
    return
  if not _OUT.value:
    raise InferenceError("--out is required")
  manifest = predictor.run(predictor.Options(
      out=_OUT.value, model=_MODEL.value, workdir=_WORKDIR.value, config=_CONFIG.value,
      fold=_FOLD.value, stage2_dir=_STAGE2_DIR.value, cell=_CELL.value, inputs=_INPUT.value,
      keys=_KEY.value, prompts=_PROMPT.value, samples=_SAMPLES.value,
      interpolate=_INTERPOLATE.value, interpolate_steps=_INTERPOLATE_STEPS.value,
      seed=_SEED.value, batch_size=_BATCH_SIZE.value, threshold=_THRESHOLD.value,
      axis=_AXIS.value, normalize=_NORMALIZE.value, resize=_RESIZE.value, roi=_ROI.value,
      overlap=_OVERLAP.value, text_encoder=_TEXT_ENCODER.value), report=print)
  print(f"Wrote {sum(len(e['files']) for e in manifest['inputs'])} files to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main, name="predict")
