r"""A local web page for prompt-driven review: ask for a style in words, see its mask.

  python -m prosona_jax.serve --model=models/demo            # an export
  python -m prosona_jax.serve --workdir=runs/demo            # a run: also its test fold
  python -m prosona_jax.serve --model=models/demo --port=0   # any free port

Prints the page's address (default http://127.0.0.1:8765/). On the page: upload a PNG,
NIfTI, DICOM or .npy image (volumes get a slice slider), or pick a case of the run's test
fold (its raters' masks are shown, and each prompt's mask names the rater it matches
best); type prompts (free text when the model's text encoder loads, else the bank's
phrasings); move a slider between two prompts; see the Stage-1 samples; download the
masks in the input's format and the probability maps. The same operations are an HTTP
JSON API under /api/ (README, "Reviewing in the browser").

Needs the optional `serve` extra: pip install 'prosona_jax[serve]' (or
bash scripts/setup.sh --serve). Listens on 127.0.0.1 only unless --host says otherwise;
there is no authentication, so another --host warns.
"""

import os
import sys

from absl import flags

from prosona_jax import cli
from prosona_jax import image_io

_MODEL = flags.DEFINE_string("model", None, "Export folder (python -m prosona_jax.export).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Training run (checkpoints) instead of --model; its test "
                               "fold's cases can be picked on the page.")
_FOLD = flags.DEFINE_integer("fold", None, "With --workdir: which fold (default: the config's).")
_STAGE2_DIR = flags.DEFINE_string("stage2_dir", None,
                                  "With --workdir: another Stage-2 dir (e.g. a grid's).")
_CELL = flags.DEFINE_integer("cell", None, "With a grid's Stage-2 dir: the cell index.")
_HOST = flags.DEFINE_string("host", "127.0.0.1",
                            "Address to listen on; anything but a loopback address lets "
                            "other machines use the app (no authentication).")
_PORT = flags.DEFINE_integer("port", 8765, "Port to listen on; 0 takes a free one.")
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 64.0,
                                    "Largest accepted upload (and request body), in MB.")
_TEXT_ENCODER = flags.DEFINE_string(
    "text_encoder", "", "Text encoder folder/hub id for free text (default: the model's "
    "config); 'none' allows bank prompts only.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Tiles per forward pass.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the prior samples (as predict's --seed).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5,
                                "Default probability above which a pixel is in the mask.")
_SAMPLES = flags.DEFINE_integer("samples", 12, "Stage-1 samples shown per image.")
_AXIS = flags.DEFINE_integer("axis", None, "Slicing axis of 3-D volumes (default: the config's).")
_NORMALIZE = flags.DEFINE_enum("normalize", "auto", image_io.NORMALIZE,
                               "Intensity normalisation of uploads.")
_RESIZE = flags.DEFINE_enum("resize", "auto", image_io.RESIZE,
                            "How slices reach the model's size (as predict's --resize).")
_OVERLAP = flags.DEFINE_float("overlap", 0.25, "Overlap of the sliding window's tiles.")
_CACHE_IMAGES = flags.DEFINE_integer("cache_images", 8, "Images kept loaded.")
_CACHE_SLICES = flags.DEFINE_integer(
    "cache_slices", 32, "Slices whose image part (backbone features, prior samples) is "
    "kept, so that prompts on them run only the projector and Fcomb.")


def main(argv):
  del argv
  from prosona_jax import webapp  # pylint: disable=g-import-not-at-top
  from prosona_jax.inference import InferenceError  # pylint: disable=g-import-not-at-top

  webapp.require_extra()  # Before loading anything: say how to install it, exit 2.
  if bool(_MODEL.value) == bool(_WORKDIR.value):
    raise InferenceError("give exactly one of --model=EXPORT_DIR and --workdir=RUN_DIR")
  if not 0 <= _PORT.value <= 65535:
    raise InferenceError(f"--port={_PORT.value}: expected 0 to 65535")
  if not _MAX_UPLOAD_MB.value > 0:
    raise InferenceError(f"--max_upload_mb={_MAX_UPLOAD_MB.value}: expected a positive size")
  sock = webapp.bind(_HOST.value, _PORT.value)  # Before the slow part: a busy port fails fast.
  local = webapp.is_loopback(_HOST.value)
  if not local:
    print(f"serve: warning: listening on {_HOST.value}: anyone who can reach this machine "
          "can use the model and upload images (there is no authentication)",
          file=sys.stderr, flush=True)
  from prosona_jax import model_loader  # pylint: disable=g-import-not-at-top
  run_config = None
  if _MODEL.value:
    model = model_loader.load_export(_MODEL.value)
  else:
    # Absolute: Orbax refuses relative checkpoint paths.
    model, run_config = model_loader.load_workdir(
        os.path.abspath(_WORKDIR.value), fold=_FOLD.value,
        stage2_dir=_STAGE2_DIR.value and os.path.abspath(_STAGE2_DIR.value), cell=_CELL.value)
  service = webapp.Service(
      model, run_config=run_config, fold=_FOLD.value, text_encoder=_TEXT_ENCODER.value,
      batch_size=_BATCH_SIZE.value, seed=_SEED.value, threshold=_THRESHOLD.value,
      normalize=_NORMALIZE.value, resize=_RESIZE.value, overlap=_OVERLAP.value,
      axis=_AXIS.value, num_samples=_SAMPLES.value, max_images=_CACHE_IMAGES.value,
      max_slices=_CACHE_SLICES.value,
      max_upload_bytes=int(_MAX_UPLOAD_MB.value * (1 << 20)))
  service.warm_up()
  info = service.info()
  print(f"serve: {model.origin}: {info['image_size']}x{info['image_size']} model; "
        f"prompts: {info['free_text_note'] if info['prompts'] else 'none (Stage 1)'}"
        + (f"; {info['cases']['count']} test-fold cases (fold {info['cases']['fold']})"
           if info["cases"] else ""), flush=True)
  allowed = None
  if local and ":" not in _HOST.value:
    # Only requests naming this machine (defends against DNS rebinding; IPv4 and names:
    # Starlette's check cuts the port off at the first colon).
    allowed = sorted({"127.0.0.1", "localhost", _HOST.value})
  print(f"Serving at {webapp.address(sock)} (Ctrl-C stops)", flush=True)
  webapp.serve(service, sock, allowed_hosts=allowed)


if __name__ == "__main__":
  cli.run(main, name="serve")
