"""Tests of the figures' labels and layout: rater ranks, readable heatmap text, titles that
neither collide nor fall outside the figure."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from prosona_jax import figures
from prosona_jax.data import inspect as inspect_data
from prosona_jax import image_io
from prosona_jax.data.npz import ArraySource
from prosona_jax.data.synthetic import SyntheticSource

NAMES = ("radiologist1", "radiologist2", "radiologist3", "radiologist4")
LIDC_PROMPTS = ("conservative mask of the solid nodule core only",
                "outline following the sharp visible edge of the nodule",
                "mask that includes part of the blurry rim",
                "inclusive mask with all faint ground-glass surroundings")


@pytest.fixture
def captured(monkeypatch):
  """The figures passed to `figures.save`, drawn (so layouts are final) and kept open."""
  figs = []

  def keep(fig, path, dpi=110):
    fig.canvas.draw()
    figs.append(fig)
    return path

  monkeypatch.setattr(figures, "save", keep)
  yield figs
  for fig in figs:
    plt.close(fig)


def _data(n=1, r=4, p=4, size=16):
  rng = np.random.default_rng(0)
  images = rng.random((n, size, size, 1)).astype(np.float32)
  labels = (rng.random((n, r, size, size)) < 0.3).astype(np.uint8)
  preds = rng.random((n, p, size, size)).astype(np.float32)
  return images, labels, preds, [f"key{i}" for i in range(n)]


def _extent(artist, fig):
  return artist.get_window_extent(fig.canvas.get_renderer())


def test_rater_labels_are_ranks_only_for_area_ordered_raters():
  assert figures.rater_labels(NAMES, True) == [
      "rater rank 1 (smallest)", "rater rank 2", "rater rank 3", "rater rank 4 (largest)"]
  assert figures.rater_labels(NAMES, False) == list(NAMES)
  assert figures.rater_labels(None, True, 2) == ["rater rank 1 (smallest)",
                                                 "rater rank 2 (largest)"]
  assert figures.rater_labels(None, False, 3) == ["rater 1", "rater 2", "rater 3"]
  # Names that do not fit the masks are not shown against the wrong slots.
  assert figures.rater_labels(NAMES[:2], False, 3) == ["rater 1", "rater 2", "rater 3"]
  with pytest.raises(ValueError):
    figures.rater_labels(None, False)


@pytest.mark.parametrize("rgb,expected", [
    ((1.0, 1.0, 1.0), "black"), ((0.0, 0.0, 0.0), "white"),
    (matplotlib.colormaps["viridis"](1.0), "black"),  # Yellow.
    (matplotlib.colormaps["viridis"](0.0), "white"),  # Dark purple.
    ((1.0, 0.0, 0.0), "black"), ((0.0, 0.0, 1.0), "white"), ((0.5, 0.5, 0.5), "black"),
])
def test_text_color_contrasts_with_the_background(rgb, expected):
  assert figures.text_color(rgb) == expected


def test_heatmap_text_is_dark_on_the_bright_best_cell(captured):
  ged = np.array([[0.31, 0.27], [0.28, 0.12]])
  figures.heatmap(ged, (0.0, 1.0), (0.0, 1.0), "unused.png")
  colors = {t.get_text(): t.get_color() for t in captured[0].axes[0].texts}
  assert colors["0.120"] == "black"  # Lowest GED: viridis_r's yellow end.
  assert colors["0.310"] == "white"  # Highest: dark purple.


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_prompt_panel_title_clears_the_prompt_headings(captured, rows):
  images, labels, preds, keys = _data(n=rows)
  figures.prompt_panel(images, labels, preds, keys, LIDC_PROMPTS, "unused.png",
                       rater_names=NAMES, order_raters_by_area=True)
  fig = captured[0]
  top = min(_extent(ax.title, fig).y0 for ax in fig.axes)
  assert any("\n" in ax.get_title() for ax in fig.axes)  # Multi-line prompt headings.
  lowest_heading = max(_extent(ax.title, fig).y1 for ax in fig.axes if ax.get_title())
  assert _extent(fig._suptitle, fig).y0 >= lowest_heading > top  # pylint: disable=protected-access


def test_panels_label_ranked_raters_by_rank(captured):
  images, labels, preds, keys = _data()
  figures.prompt_panel(images, labels, preds, keys, LIDC_PROMPTS, "unused.png",
                       rater_names=NAMES, order_raters_by_area=True)
  figures.samples_panel(images, labels, preds, keys, "unused.png", rater_names=NAMES,
                        order_raters_by_area=True)
  # The old call signature still works and shows the names.
  figures.samples_panel(images, labels, preds, keys, "unused.png", NAMES, 4)
  for fig in captured[:2]:
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes[1:5]]
    assert titles == figures.rater_labels(NAMES, True)
  assert [ax.get_title() for ax in captured[2].axes[1:5]] == list(NAMES)


def test_interpolation_strip_names_its_image(captured):
  images, _, preds, _ = _data()
  figures.interpolation_strip(images[0], preds[0], [0.0, 0.3, 0.7, 1.0], "small", "large",
                              "unused.png", image_name="LIDC-IDRI-0042_slice7")
  figures.interpolation_strip(images[0], preds[0], [0.0, 0.3, 0.7, 1.0], "small", "large",
                              "unused.png")
  titles = [fig._suptitle.get_text() for fig in captured]  # pylint: disable=protected-access
  assert titles[0].startswith("LIDC-IDRI-0042_slice7: ") and "'small'" in titles[0]
  assert titles[1] == "'small'  ->  'large'"


def test_overlay_says_which_slice_it_shows(monkeypatch, tmp_path):
  """predict's overlay (Pillow, image_io.write_overlay) heads its image panel with the slice."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  images, _, preds, _ = _data()
  texts = []
  real = ImageDraw.ImageDraw.multiline_text

  def recording(self, xy, text, *args, **kwargs):
    texts.append(text)
    return real(self, xy, text, *args, **kwargs)

  monkeypatch.setattr(ImageDraw.ImageDraw, "multiline_text", recording)
  first = image_io.write_overlay(images[0], preds[0], list(LIDC_PROMPTS),
                                 str(tmp_path / "a.png"), 0.5,
                                 subtitle="slice 12 of 30 (from 0) along axis 2")
  n = len(texts)
  image_io.write_overlay(images[0], preds[0], list(LIDC_PROMPTS), str(tmp_path / "b.png"), 0.5)
  assert n == 1 + len(LIDC_PROMPTS) and len(texts) == 2 * n
  assert "slice 12 of 30" in texts[0].replace("\n", " ")
  assert texts[n] == ""
  assert any(LIDC_PROMPTS[0][:10] in t.replace("\n", " ") for t in texts[1:n])
  assert Image.open(first).size[0] > Image.open(first).size[1]


def _drawn_examples(monkeypatch, source, tmp_path):
  """Runs `inspect_data.draw_examples` and returns its figure, drawn, before it closes."""
  figs = []
  real_close = plt.close
  monkeypatch.setattr(plt, "close", lambda fig=None: figs.append(fig))
  inspect_data.draw_examples(source, str(tmp_path / "ex.png"), 3)
  monkeypatch.setattr(plt, "close", real_close)
  figs[0].canvas.draw()
  return figs[0]


def test_inspect_examples_keep_titles_and_legend_inside_the_figure(monkeypatch, tmp_path):
  long_keys = [f"LIDC-IDRI-{i:04d}_1.3.6.1.4.1.14519.5.2.1.6279_slice{i:03d}_lesion1"
               for i in range(3)]
  rng = np.random.default_rng(0)
  source = ArraySource.from_arrays(
      rng.random((3, 32, 32, 1)).astype(np.float32),
      (rng.random((3, 4, 32, 32)) < 0.2).astype(np.uint8), long_keys, ["a", "b", "c"],
      order_raters_by_area=True, format_name="npz")
  fig = _drawn_examples(monkeypatch, source, tmp_path)
  box = fig.bbox
  for ax in fig.axes:
    title = _extent(ax.title, fig)
    assert ax.get_title() and box.x0 <= title.x0 and title.x1 <= box.x1
    assert title.y1 <= box.y1
  legend = fig.legends[0]
  assert box.y0 <= _extent(legend, fig).y0
  assert [t.get_text() for t in legend.get_texts()] == figures.rater_labels(None, True, 4)
  plt.close(fig)


def test_inspect_examples_name_the_synthetic_styles(monkeypatch, tmp_path):
  source = SyntheticSource(num_images=8, num_patients=4, image_size=32)
  fig = _drawn_examples(monkeypatch, source, tmp_path)
  assert [t.get_text() for t in fig.legends[0].get_texts()] == list(source.rater_names)
  plt.close(fig)
