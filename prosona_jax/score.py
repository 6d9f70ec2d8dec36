r"""Scores saved predictions against multi-rater labels (every metric of docs/metrics.md).

Usage:
  python -m prosona_jax.score --labels L.npy --preds P.npy \
      [--convention dpersona|standard] [--rank-by-area] [--json FILE]

`L.npy` holds the rater masks (N, R, H, W) in {0, 1}; `P.npy` the predicted probabilities
(N, S, H, W) in [0, 1] (S prior samples, or one prediction per rater ordered like the
raters). The mean of each metric is printed as a table, with the convention it uses; `--json`
also writes the per-image values (`prosona_jax.metrics.score`'s dict).
"""

from absl import flags

from prosona_jax import cli
from prosona_jax import metrics

_LABELS = flags.DEFINE_string("labels", None, ".npy file of rater masks (N, R, H, W) in {0, 1}.")
_PREDS = flags.DEFINE_string("preds", None, ".npy file of probabilities (N, S, H, W) in [0, 1].")
_CONVENTION = flags.DEFINE_enum("convention", "dpersona", list(metrics.CONVENTIONS),
                                "What empty masks are worth: dpersona (the D-Persona/ProSona "
                                "tables) or standard (Probabilistic U-Net/PHiSeg); see "
                                "docs/metrics.md.")
_RANK_BY_AREA = flags.DEFINE_bool("rank_by_area", False,
                                  "Sort each image's raters by ascending area before scoring.")
flags.DEFINE_alias("rank-by-area", "rank_by_area")
_JSON = flags.DEFINE_string("json", None, "Also write the per-image and mean metrics here.")


def main(argv) -> int:
  del argv
  from prosona_jax import scoring  # pylint: disable=g-import-not-at-top
  if not _LABELS.value or not _PREDS.value:
    raise scoring.ScoreFileError("--labels and --preds are required")
  scoring.run(_LABELS.value, _PREDS.value, convention=_CONVENTION.value,
              rank_by_area=_RANK_BY_AREA.value, json_path=_JSON.value)
  return 0


if __name__ == "__main__":
  cli.run(main, name="score")
