"""Prompt banks: the phrasings that describe each rater, and their frozen embeddings.

A bank holds P phrasings, the rater each describes and whether it is held out (used only at
evaluation, to test that the projector generalises to unseen wordings). The text encoder is
frozen, so a bank is embedded once per run (`PromptBank.embed`) and saved next to the
checkpoint (`save` / `load`): inference with bank prompts then needs no text encoder.

Default banks are plain Python data shaped like the config fields
(`config.text.prompts.train` / `.heldout`: one tuple of phrasings per rater, rater order),
so a config can take them as they are: `c.text.prompts.train = LIDC_PROMPTS["train"]`.
Phrasings of one rater are paraphrases around one idea (LIDC: how tight the contour is);
the raters differ in that idea, so a sentence encoder keeps them apart.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping, Protocol, Sequence

import numpy as np

Phrasings = tuple[tuple[str, ...], ...]

# LIDC: raters ordered per image from the smallest to the largest mask (docs/method.md).
LIDC_PROMPTS: dict[str, Phrasings] = {
    "train": (
        ("conservative mask of the solid nodule core only",
         "tight contour around the dense solid core",
         "only the solid core of the nodule, strictly",
         "minimal segmentation restricted to the solid core",
         "small nodule only: just the solid core"),
        ("outline following the sharp visible edge of the nodule",
         "contour drawn exactly on the crisp nodule edge",
         "mask up to the sharp boundary where the nodule ends",
         "precise segmentation along the clear, sharp edge",
         "edge-following contour at the sharp nodule border"),
        ("mask that includes part of the blurry rim",
         "contour extending into the hazy, blurred border",
         "segmentation taking in some of the blurry halo",
         "outline that crosses the edge into the hazy rim",
         "nodule plus part of its blurred, hazy rim"),
        ("inclusive mask with all faint ground-glass surroundings",
         "generous contour that includes every faint, subtle region",
         "include subtle regions and faint tissue around the nodule",
         "largest mask taking in all faint surrounding ground-glass",
         "inclusive segmentation of every subtle, faint opacity"),
    ),
    "heldout": (
        ("strictly the solid nodule core", "a tight, conservative core-only mask"),
        ("contour on the crisp visible edge",
         "segmentation that stops at the sharp border"),
        ("include some of the hazy blurred rim", "contour reaching into the blurry halo"),
        ("include subtle regions", "generous mask with all faint surroundings"),
    ),
}

# The synthetic set (prosona_jax.data.synthetic): rater 1 draws the solid core only,
# rater 4 the core plus the faint zone around it with a generous margin.
SYNTHETIC_PROMPTS: dict[str, Phrasings] = {
    "train": (
        ("solid core only",
         "tight mask of only the solid core",
         "conservative segmentation of just the solid core",
         "only the solid core, nothing around it",
         "minimal contour of the solid core"),
        ("core plus a thin rim",
         "a thin rim around the solid core",
         "mask of the core and a thin outer ring",
         "contour one thin rim outside the core",
         "slightly enlarged core with a thin rim"),
        ("core and halfway into the faint zone",
         "mask reaching halfway into the faint zone",
         "halfway into the faint zone, not the whole of it",
         "segmentation covering half of the faint zone",
         "contour stopping halfway out, midway through the haze"),
        ("core plus faint surrounding zone, generous margin",
         "inclusive mask with a wide, generous margin all round",
         "the most inclusive segmentation with a generous margin",
         "largest contour: everything plus a generous margin",
         "everything that might belong, plus a generous margin"),
    ),
    "heldout": (
        ("just the bright solid core", "strict segmentation of the solid core"),
        ("core with a narrow rim", "solid core and a thin ring"),
        ("halfway into the faint zone", "contour halfway out from the core"),
        ("a wide, generous margin around the faint zone", "generous, inclusive outline"),
    ),
}

# Prostate: one annotation style per institution (identity order, not area order).
PROSTATE_PROMPTS: dict[str, Phrasings] = {
    "train": (
        ("tight prostate contour on the capsule",
         "conservative gland outline following the capsule closely",
         "prostate mask hugging the capsule",
         "tight segmentation along the prostatic capsule",
         "narrow contour of the gland at the capsule"),
        ("smooth rounded prostate outline",
         "smoothed gland contour with rounded edges",
         "regular, smooth, rounded segmentation of the prostate",
         "prostate mask with a soft rounded boundary",
         "gently smoothed, round outline of the gland"),
        ("contour including the apex and the base",
         "prostate outline extended to the apex and base",
         "segmentation covering the prostate apex and base",
         "mask that keeps the apex and the base of the gland",
         "complete apex-to-base contour of the prostate"),
        ("generous prostate contour with a wide outer margin",
         "inclusive gland outline with a margin of surrounding tissue",
         "wide prostate mask with a generous margin",
         "generous segmentation extending beyond the gland",
         "broad contour of the gland with extra margin"),
    ),
    "heldout": (
        ("capsule-tight prostate mask", "strict contour on the prostate capsule"),
        ("rounded smooth gland mask", "soft smooth prostate boundary"),
        ("contour reaching the prostate apex and base",
         "gland segmentation from apex to base"),
        ("prostate mask with an extra margin", "wide inclusive gland contour"),
    ),
}

DEFAULT_PROMPTS: dict[str, dict[str, Phrasings]] = {
    "lidc": LIDC_PROMPTS, "synthetic": SYNTHETIC_PROMPTS, "prostate": PROSTATE_PROMPTS,
}


class _Encoder(Protocol):
  """What `PromptBank.embed` needs from a text encoder."""
  name: str

  def encode(self, prompts: Sequence[str]) -> np.ndarray:
    ...


@dataclasses.dataclass
class PromptBank:
  """P phrasings with their rater, held-out flag and (once embedded) embeddings.

  Attributes:
    prompts: the P phrasings.
    rater: (P,) int, the rater index (config order) each phrasing describes.
    heldout: (P,) bool, True for phrasings used only at evaluation.
    embeddings: (P, d) float32 frozen text embeddings, or None before `embed`.
    encoder_name: name of the encoder that made `embeddings` ("" when none).
  """
  prompts: list[str]
  rater: np.ndarray
  heldout: np.ndarray
  embeddings: np.ndarray | None = None
  encoder_name: str = ""

  def __post_init__(self):
    self.prompts = [str(p) for p in self.prompts]
    self.rater = np.asarray(self.rater, np.int32).reshape(-1)
    self.heldout = np.asarray(self.heldout, bool).reshape(-1)
    n = len(self.prompts)
    if self.rater.shape != (n,) or self.heldout.shape != (n,):
      raise ValueError(f"PromptBank: {n} prompts but rater {self.rater.shape}, "
                       f"heldout {self.heldout.shape}.")
    if self.embeddings is not None:
      self.embeddings = np.asarray(self.embeddings, np.float32)
      if self.embeddings.ndim != 2 or self.embeddings.shape[0] != n:
        raise ValueError(f"PromptBank: embeddings {self.embeddings.shape} for {n} prompts.")
    if len(set(self.prompts)) != n:
      raise ValueError("PromptBank: duplicate phrasings make `lookup` ambiguous.")

  # ------------------------------------------------------------------ building
  @classmethod
  def from_phrasings(cls, train: Sequence[Sequence[str]],
                     heldout: Sequence[Sequence[str]] = ()) -> "PromptBank":
    """Builds a bank from per-rater phrasings (train first, then held-out)."""
    if heldout and len(heldout) != len(train):
      raise ValueError(f"{len(train)} raters of train phrasings but {len(heldout)} held-out.")
    prompts, rater, held = [], [], []
    for is_held, groups in ((False, train), (True, heldout)):
      for r, group in enumerate(groups):
        if isinstance(group, str):  # A bare string would split into characters.
          raise ValueError(f"rater {r}: expected a tuple of phrasings, got {group!r}.")
        for p in group:
          prompts.append(p)
          rater.append(r)
          held.append(is_held)
    return cls(prompts, np.array(rater, np.int32), np.array(held, bool))

  @classmethod
  def from_config(cls, prompts_cfg: Any, *, default: str | None = None) -> "PromptBank":
    """Builds the bank of `config.text.prompts`.

    Args:
      prompts_cfg: an object with `train` and `heldout` (the config's `text.prompts`).
      default: a key of DEFAULT_PROMPTS used when `train` is empty.
    """
    train, held = tuple(prompts_cfg.train), tuple(prompts_cfg.heldout)
    if not train:
      if default is None:
        raise ValueError("config.text.prompts.train is empty and no default bank was named.")
      train, held = DEFAULT_PROMPTS[default]["train"], DEFAULT_PROMPTS[default]["heldout"]
    return cls.from_phrasings(train, held)

  # ------------------------------------------------------------------ views
  def __len__(self) -> int:
    return len(self.prompts)

  @property
  def num_raters(self) -> int:
    return int(self.rater.max()) + 1 if len(self) else 0

  def subset(self, keep: np.ndarray) -> "PromptBank":
    """The bank restricted to the rows where `keep` (bool (P,) or indices) selects."""
    idx = np.arange(len(self))[keep]
    emb = None if self.embeddings is None else self.embeddings[idx]
    return PromptBank([self.prompts[i] for i in idx], self.rater[idx], self.heldout[idx],
                      emb, self.encoder_name)

  def train_view(self) -> "PromptBank":
    """The phrasings Stage 2 trains on."""
    return self.subset(~self.heldout)

  def heldout_view(self) -> "PromptBank":
    """The phrasings kept for evaluation."""
    return self.subset(self.heldout)

  def for_rater(self, r: int) -> "PromptBank":
    """The phrasings of rater `r`."""
    return self.subset(self.rater == r)

  def canonical_indices(self) -> np.ndarray:
    """Index of each rater's first training phrasing, in rater order (default prompts)."""
    train = ~np.asarray(self.heldout)
    return np.asarray([int(np.flatnonzero(train & (np.asarray(self.rater) == r))[0])
                       for r in range(self.num_raters)])

  def positive_mask(self) -> np.ndarray:
    """(P, P) float32, M_ij = 1 when prompts i and j describe the same rater (diagonal 1)."""
    return (self.rater[:, None] == self.rater[None, :]).astype(np.float32)

  def index(self, prompt: str) -> int:
    """Row of `prompt`; a KeyError names the closest phrasings when it is not in the bank."""
    try:
      return self.prompts.index(prompt)
    except ValueError:
      close = difflib.get_close_matches(prompt, self.prompts, n=3)
      raise KeyError(f"prompt {prompt!r} is not in the bank (closest: {close}); "
                     "embed free text with the text encoder instead.") from None

  def lookup(self, prompt: str) -> np.ndarray:
    """(d,) stored embedding of a bank phrasing: no encoder needed at inference."""
    if self.embeddings is None:
      raise ValueError("PromptBank.lookup: the bank is not embedded; call embed(encoder).")
    return self.embeddings[self.index(prompt)]

  # ------------------------------------------------------------------ embedding and files
  def embed(self, encoder: _Encoder) -> "PromptBank":
    """Returns a copy with `embeddings` from the frozen encoder (run once per run)."""
    emb = np.asarray(encoder.encode(self.prompts), np.float32)
    return dataclasses.replace(self, embeddings=emb, encoder_name=encoder.name)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the bank to one `.npz` file (no pickles: strings are stored as unicode)."""
    arrays = {"prompts": np.array(self.prompts, dtype=np.str_), "rater": self.rater,
              "heldout": self.heldout, "encoder_name": np.array(self.encoder_name)}
    if self.embeddings is not None:
      arrays["embeddings"] = self.embeddings
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(path)  # Local or remote (gs://) paths alike.
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # An open file keeps numpy from appending ".npz".
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "PromptBank":
    """Reads a bank written by `save`."""
    from etils import epath  # pylint: disable=g-import-not-at-top
    with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as z:
      emb = z["embeddings"] if "embeddings" in z.files else None
      return cls([str(p) for p in z["prompts"]], z["rater"], z["heldout"], emb,
                 str(z["encoder_name"]))

  def to_phrasings(self) -> Mapping[str, Phrasings]:
    """The bank as config-shaped data: {"train": ..., "heldout": ...}."""
    out = {}
    for key, view in (("train", self.train_view()), ("heldout", self.heldout_view())):
      out[key] = tuple(tuple(view.for_rater(r).prompts) for r in range(self.num_raters))
    return out
