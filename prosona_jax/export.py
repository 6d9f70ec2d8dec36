r"""Exports a trained fold as a self-contained model folder.

  python -m prosona_jax.export --workdir=runs/lidc --out=models/lidc_fold0 [--fold=0]
  python -m prosona_jax.export --workdir=runs/grid --stage2_dir=runs/grid/fold0/grid \
      --cell=4 --out=models/cell4   # one cell of a grid trained in one program
  python -m prosona_jax.export --workdir=runs/grid/cells/alpha0.5_beta1 --out=models/cell
      # a cell run as its own job is a work directory

The folder (see the README.md written into it) holds `params.safetensors` (every model
tensor but the text encoder's), `config.json` (what inference needs, with a format
version), `prompt_bank.npz` (phrasings with cached embeddings) and the inference functions
serialized with `jax.export` (StableHLO, symbolic batch size), which run without this
package's model code: `python -m prosona_jax.predict --model=DIR` uses only them.
"""

from absl import flags

from prosona_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run to export.")
_OUT = flags.DEFINE_string("out", None, "Output model folder.")
_FOLD = flags.DEFINE_integer("fold", None, "Fold to export (default: the config's, or 0).")
_STAGE2_DIR = flags.DEFINE_string(
    "stage2_dir", None, "A Stage-2 directory to export instead of WORKDIR/fold<k>/stage2.")
_CELL = flags.DEFINE_integer("cell", None, "With a grid's WORKDIR/fold<k>/grid: the cell index.")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"],
                               "Platforms to lower for (cpu, cuda, rocm, tpu).")
_CONFIG = cli.define_config_file("config", None, "Overrides WORKDIR/config.json.")


def main(argv):
  del argv
  from prosona_jax import exporter  # pylint: disable=g-import-not-at-top
  from prosona_jax.inference import InferenceError  # pylint: disable=g-import-not-at-top

  if not _WORKDIR.value or not _OUT.value:
    raise InferenceError("--workdir and --out are required")
  meta = exporter.export_run(_WORKDIR.value, _OUT.value, fold=_FOLD.value, config=_CONFIG.value,
                             stage2_dir=_STAGE2_DIR.value, cell=_CELL.value,
                             platforms=_PLATFORMS.value)
  print(f"Exported {', '.join(meta['functions'])} to {_OUT.value}")


if __name__ == "__main__":
  cli.run(main, name="export")
