r"""The results table of several runs: one row per method, mean ± std over folds.

Usage:
  python -m prosona_jax.table runs/prosona runs/unet runs/cm_global ... [--out DIR]
  python -m prosona_jax.table 'runs/*' --published --stage1

Reads each run's `eval/<stage>_fold<k>.json` and writes `table.md`, `table.csv` and
`table.json` to `--out` (default: the current directory), and prints the Markdown table.
Columns: GED, Dice Soft, Dice Max, Dice Max (rev.), Dice Match, Mean Dice (matched and
direct); "-" where a column does not apply. `--published` puts the paper's Table-1
numbers beside the rows they exist for. The work is in `results_table.py`.
"""

import sys

from absl import flags

from prosona_jax import cli

_OUT = flags.DEFINE_string("out", ".", "Folder for table.md, table.csv and table.json.")
_PUBLISHED = flags.DEFINE_bool("published", False,
                               "Add the published Table-1 numbers beside the rows.")
_DATASET = flags.DEFINE_enum("published_dataset", "lidc", ["lidc", "prostate"],
                             "Which published table --published adds.")
_STAGE1 = flags.DEFINE_bool("stage1", False, "Also tabulate ProSona's (and D-Persona's) "
                            "Stage-1 models (rows <method>_stage1).")
# Run directories are positional; any number of them (or quoted globs).
MAX_RUNS = 10_000


def main(argv) -> int:
  from prosona_jax import results_table  # pylint: disable=g-import-not-at-top
  table = results_table.build(list(argv[1:]), stage1=_STAGE1.value,
                              published=_DATASET.value if _PUBLISHED.value else None)
  paths = results_table.write(table, _OUT.value)
  print(results_table.to_markdown(table))
  print("Wrote " + ", ".join(paths.values()), file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main, name="table", positional=MAX_RUNS)
