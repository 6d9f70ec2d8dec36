"""Tests of the LIDC pickle readers, the restricted unpickler, `.npz` and format detection."""

import os
import pathlib
import pickle
import subprocess
import sys
import zipfile
from unittest import mock

import numpy as np
import pytest

from prosona_jax.data import npz as npz_reader
from prosona_jax.data import safe_pickle
from prosona_jax.data.errors import DataError
from prosona_jax.data.limits import ReadLimits
from prosona_jax.data.lidc import load_lidc_pickle
from prosona_jax.data.sources import detect_format, open_source, source_from_config
from prosona_jax import config_defaults

REPO = pathlib.Path(__file__).parents[1]
# The shared LIDC samples (conftest's `shared_data` fixture finds their folder).
CROPS = "data_lidc_sample.pickle"
ATTRIBUTES = "lidc_attributes_sample.pkl"
SHOWCASE = "lidc_showcase6.npz"


@pytest.fixture(scope="module")
def showcase(shared_data):
  with np.load(shared_data / SHOWCASE) as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def crops(shared_data):
  return shared_data / CROPS


@pytest.fixture(scope="module")
def attributes(shared_data):
  return shared_data / ATTRIBUTES


def _items(source):
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("name,fmt,tol", [(CROPS, "lidc_crops", 0.0),
                                          (ATTRIBUTES, "lidc_attributes", 0.5 / 255 + 1e-6)])
def test_lidc_pickles_match_the_showcase(shared_data, showcase, name, fmt, tol):
  path = shared_data / name
  assert detect_format(path) == fmt
  source = open_source(path, order_raters_by_area=False)
  assert source.format_name == fmt and len(source) == 6 and source.num_raters == 4
  assert source.image_shape == (128, 128, 1)
  assert source.keys == showcase["keys"].tolist()
  assert source.patient_ids == [k.split("_")[0] for k in showcase["keys"]]
  for i, item in enumerate(_items(source)):
    assert item["image"].dtype == np.float32 and item["image"].shape == (128, 128, 1)
    assert item["masks"].dtype == np.uint8 and item["masks"].shape == (4, 128, 128)
    np.testing.assert_allclose(item["image"][..., 0], showcase["images"][i], atol=tol, rtol=0)
    np.testing.assert_array_equal(item["masks"], showcase["masks"][i])
    assert item["key"] == showcase["keys"][i]


def test_lidc_default_orders_raters_by_area_stably(showcase, crops):
  source = open_source(crops)  # LIDC default: ordered.
  assert source.order_raters_by_area
  areas = showcase["masks"].sum(axis=(2, 3))
  order = np.argsort(areas, axis=1, kind="stable")
  for i, item in enumerate(_items(source)):
    np.testing.assert_array_equal(item["masks"], showcase["masks"][i][order[i]])
  assert np.all(np.diff(source.mask_areas(), axis=1) >= 0)
  assert "ordered by area" in source.describe()


_NO_PYDICOM = """
import sys
sys.modules["pydicom"] = None
from prosona_jax.data import safe_pickle
from prosona_jax.data.sources import open_source
source = open_source(sys.argv[1])
assert safe_pickle.resolve_global("x", "pydicom.uid", "UID") is safe_pickle.UID
assert "pydicom" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
print(source.format_name, source.mask_areas().tolist(), float(source[2]["image"].sum()))
"""


def test_crops_pickle_loads_without_pydicom(crops):
  out = subprocess.run([sys.executable, "-c", _NO_PYDICOM, str(crops)], cwd=REPO,
                       capture_output=True, text=True, check=True).stdout.split(" ", 1)
  source = open_source(crops)
  assert out[0] == "lidc_crops"
  assert out[1].strip() == f"{source.mask_areas().tolist()} {float(source[2]['image'].sum())}"


def test_pydicom_stand_ins(monkeypatch):
  for name in ("pydicom", "pydicom.uid", "pydicom.valuerep"):
    monkeypatch.setitem(sys.modules, name, None)
  uid = safe_pickle.resolve_global("f", "pydicom.uid", "UID")
  assert uid is safe_pickle.UID and uid("1.2.3") == "1.2.3"
  assert safe_pickle.resolve_global("f", "dicom.UID", "UID") is safe_pickle.UID


def test_sources_pickle_for_grain_workers(attributes):
  import grain.python as grain  # pylint: disable=g-import-not-at-top
  source = open_source(attributes)
  copy = pickle.loads(pickle.dumps(source))
  assert copy.keys == source.keys and "lidc_attributes" in repr(copy)
  np.testing.assert_array_equal(copy[3]["masks"], source[3]["masks"])
  assert grain.MapDataset.source(source)[5]["key"] == source.keys[5]


class _Evil:
  def __init__(self, fn, arg):
    self.fn, self.arg = fn, arg

  def __reduce__(self):
    return self.fn, (self.arg,)


@pytest.mark.parametrize("how", ["system", "eval"])
@pytest.mark.parametrize("protocol", [3, 4])
def test_malicious_pickle_is_refused_not_run(tmp_path, how, protocol):
  marker = tmp_path / "pwned"
  if how == "system":
    evil, forbidden = _Evil(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
  else:
    evil, forbidden = _Evil(eval, f"open({str(marker)!r}, 'w')"), "builtins.eval"
  path = tmp_path / "evil.pkl"
  record = {"image": evil, "masks": [np.zeros((4, 4), np.uint8)]}
  path.write_bytes(pickle.dumps({"a_slice0": record}, protocol=protocol))
  for load in (lambda: open_source(path), lambda: open_source(path, "lidc_crops"),
               lambda: safe_pickle.safe_load(path)):
    with pytest.raises(DataError, match=forbidden) as e:
      load()
    assert str(path) in str(e.value)
  assert not marker.exists()


def _record(rng, raters=4, size=8, image=None):
  masks = [(rng.random((size, size)) < 0.3).astype(np.uint8) for _ in range(raters)]
  return {"image": rng.random((size, size)) if image is None else image, "masks": masks,
          "series_uid": "1.2.3"}


def _write(tmp_path, records, name="bad.pickle"):
  path = tmp_path / name
  path.write_bytes(pickle.dumps(records, protocol=3))
  return path


def test_lidc_streams_many_records_in_chunks(tmp_path):
  rng = np.random.default_rng(0)
  records = {f"p{i // 7}_slice{i}": _record(rng) for i in range(1100)}  # > one batch.
  source = load_lidc_pickle(_write(tmp_path, records, "ok.pickle"), progress_every=500)
  assert len(source) == 1100 and len(set(source.patient_ids)) == 158
  key = "p150_slice1050"
  i = source.keys.index(key)
  order = np.argsort([m.sum() for m in records[key]["masks"]], kind="stable")
  np.testing.assert_array_equal(source[i]["masks"], np.stack(records[key]["masks"])[order])
  np.testing.assert_allclose(source[-1]["image"][..., 0], records["p157_slice1099"]["image"],
                             rtol=1e-6)


@pytest.mark.parametrize("break_it,expected", [
    (lambda r: r.pop("masks"), "missing field 'masks'"),
    (lambda r: r["masks"][1].__setitem__((0, 0), 2), r"masks must be in \{0, 1\}"),
    (lambda r: r["masks"].__setitem__(2, np.zeros((8, 9), np.uint8)), "mask 2 has shape"),
    (lambda r: r["masks"].pop(), "3 masks; the first record has 4"),
    (lambda r: r["image"].__setitem__((3, 3), np.nan), "NaN or infinite"),
    (lambda r: r.__setitem__("image", np.zeros((9, 9))), "differs from the first"),
])
def test_lidc_bad_records_are_errors(tmp_path, break_it, expected):
  rng = np.random.default_rng(1)
  records = {f"s{i}_slice{i}": _record(rng) for i in range(3)}
  break_it(records["s2_slice2"])
  path = _write(tmp_path, records)
  with pytest.raises(DataError, match=expected) as e:
    open_source(path, "lidc_crops")
  assert str(path) in str(e.value) and "'s2_slice2'" in str(e.value)


def test_lidc_attributes_thresholds_soft_masks_but_refuses_out_of_range(tmp_path):
  rng = np.random.default_rng(2)
  image = (rng.random((8, 8)) * 255).astype(np.uint8)
  rec = _record(rng, image=image)
  rec["masks"][0] = np.full((8, 8), 0.7)
  rec["alpha"] = image
  source = open_source(_write(tmp_path, {"a_slice0": rec}, "soft.pkl"))
  assert source.format_name == "lidc_attributes"
  assert source[0]["masks"].max() == 1 and source.mask_areas().max() == 64
  np.testing.assert_allclose(source[0]["image"][..., 0], image / 255.0, rtol=1e-6)
  rec["masks"][0] = np.full((8, 8), 255)
  with pytest.raises(DataError, match=r"in \[0, 1\].*'a_slice0'|'a_slice0'.*in \[0, 1\]"):
    open_source(_write(tmp_path, {"a_slice0": rec}, "bad.pkl"))


def _npz(tmp_path, **arrays):
  path = tmp_path / "set.npz"
  np.savez(path, **arrays)
  return path


def test_npz_reads_and_groups_patients(tmp_path):
  rng = np.random.default_rng(3)
  images = rng.random((5, 8, 8)).astype(np.float32)
  masks = (rng.random((5, 3, 8, 8)) < 0.5).astype(np.uint8)
  keys = np.array([f"p{i // 2}_slice{i}" for i in range(5)])
  source = open_source(_npz(tmp_path, images=images, masks=masks, keys=keys))
  assert source.patient_ids == ["p0", "p0", "p1", "p1", "p2"] and source.num_raters == 3
  assert not source.order_raters_by_area  # npz default: identity order.
  np.testing.assert_array_equal(source[4]["masks"], masks[4])
  uids = np.array(["u1", "u1", "u1", "u2", "u2"])
  source = open_source(_npz(tmp_path, images=images[..., None], masks=masks, keys=keys,
                            series_uid=uids))
  assert source.patient_ids == uids.tolist() and source.image_shape == (8, 8, 1)
  source = open_source(_npz(tmp_path, images=images, masks=masks))
  assert len(set(source.patient_ids)) == 5  # No keys: every image its own patient.
  assert source.patient_grouping == "one_per_image"


@pytest.mark.parametrize("change,expected", [
    (lambda a: a["masks"].__setitem__((1, 0, 0, 0), 3), r"'masks'.*\{0, 1\}.*key 'k1'"),
    (lambda a: a.__setitem__("masks", a["masks"][:, :, :7]), r"'masks'.*disagree"),
    (lambda a: a["images"].__setitem__((2, 1, 1), np.nan), r"'images'.*NaN.*key 'k2'"),
    (lambda a: a["images"].__setitem__((0, 1, 1), np.inf), r"'images'.*infinite"),
    (lambda a: a.pop("masks"), r"'masks': missing array"),
    (lambda a: a.__setitem__("images", (a["images"] * 9).astype(np.uint8)), "must be float"),
    (lambda a: a.__setitem__("keys", a["keys"][:2]), r"'keys': expected \(3,\)"),
])
def test_npz_bad_arrays_are_errors(tmp_path, change, expected):
  arrays = {"images": np.zeros((3, 8, 8), np.float32), "masks": np.zeros((3, 2, 8, 8)),
            "keys": np.array(["k0", "k1", "k2"])}
  change(arrays)
  path = _npz(tmp_path, **arrays)
  with pytest.raises(DataError, match=expected) as e:
    open_source(path)
  assert str(path) in str(e.value)


def _npz_member(zf, name, header, data=b""):
  """Writes `name.npy` with an arbitrary (possibly lying) header."""
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, header)
  zf.writestr(name + ".npy", buf.getvalue() + data)


def test_npz_header_claiming_a_huge_array_is_refused_before_allocation(tmp_path):
  path = tmp_path / "huge.npz"
  with zipfile.ZipFile(path, "w") as zf:
    _npz_member(zf, "images", {"descr": "<f4", "fortran_order": False,
                               "shape": (10**6, 10**6)}, bytes(64))
    _npz_member(zf, "masks", {"descr": "|u1", "fortran_order": False,
                              "shape": (1, 1, 4, 4)}, bytes(16))
  with mock.patch.object(np, "load", side_effect=AssertionError("np.load was reached")):
    with pytest.raises(DataError, match=r"'images': the header declares shape "
                       r"\(1000000, 1000000\) float32 = 4,000,000,000,000 bytes, over the "
                       r"limit of 268,435,456 bytes") as e:
      open_source(path)
  assert str(path) in str(e.value) and "PROSONA_DATA_MAX_BYTES" in str(e.value)


def test_npz_header_and_member_size_must_agree(tmp_path):
  path = tmp_path / "short.npz"
  with zipfile.ZipFile(path, "w") as zf:
    _npz_member(zf, "images", {"descr": "<f4", "fortran_order": False,
                               "shape": (2, 8, 8)}, bytes(100))
  with pytest.raises(DataError, match=r"'images': the header declares 512 bytes of data but "
                     r"the member holds 100"):
    open_source(path)


def test_npz_total_size_is_bounded_by_the_file_or_the_ceiling(tmp_path):
  images = np.zeros((64, 32, 32), np.float32)  # 256 KiB of zeros deflate to ~1 KiB.
  path = tmp_path / "zeros.npz"
  np.savez_compressed(path, images=images, masks=np.zeros((64, 1, 32, 32), np.uint8))
  small = ReadLimits(multiple=8.0, floor_bytes=100_000)
  with pytest.raises(DataError, match="over the limit of 100,000 bytes"):
    npz_reader.load_npz(path, limits=small)
  assert len(npz_reader.load_npz(path, limits=ReadLimits(multiple=8.0,
                                                         floor_bytes=10**6))) == 64
  with mock.patch.dict(os.environ, {"PROSONA_DATA_MAX_BYTES": "100000"}):
    with pytest.raises(DataError, match="over the limit of 100,000 bytes"):
      npz_reader.load_npz(path, limits=ReadLimits(multiple=8.0))


@pytest.mark.parametrize("name", ["images", "masks", "keys", "patient_ids"])
def test_npz_object_arrays_are_refused_without_a_traceback(tmp_path, name):
  arrays = {"images": np.zeros((2, 4, 4), np.float32), "masks": np.zeros((2, 1, 4, 4)),
            "keys": np.array(["a_0", "a_1"]), "patient_ids": np.array(["a", "a"])}
  arrays[name] = np.array([{"x": 1}, None], dtype=object)
  path = tmp_path / "obj.npz"
  np.savez(path, **arrays)
  with pytest.raises(DataError, match=rf"'{name}': object array \(dtype object\) refused"):
    open_source(path)


def test_npz_that_is_not_a_zip_is_an_error(tmp_path):
  path = tmp_path / "plain.npz"
  np.save(path, np.zeros(3))
  os.replace(str(path) + ".npy", path)
  with pytest.raises(DataError, match=r"not a \.npz \(zip\) archive"):
    open_source(path)


@pytest.mark.parametrize("keys,ids,grouping", [
    (None, None, "one_per_image"),
    ([f"scan{i // 2}slice{i}" for i in range(8)], None, "one_per_image"),  # No `_`.
    ([f"scan{i}_slice{i}" for i in range(8)], None, "one_per_image"),  # All distinct.
    ([f"scan{i // 2}_slice{i}" for i in range(8)], None, "derived_from_keys"),
    ([f"scan{i // 2}slice{i}" for i in range(8)], [f"p{i // 2}" for i in range(8)], "given"),
])
def test_npz_patient_grouping_is_visible(tmp_path, keys, ids, grouping):
  arrays = {"images": np.zeros((8, 4, 4), np.float32), "masks": np.zeros((8, 1, 4, 4))}
  if keys is not None:
    arrays["keys"] = np.array(keys)
  if ids is not None:
    arrays["patient_ids"] = np.array(ids)
  path = _npz(tmp_path, **arrays)
  with mock.patch.object(npz_reader.logging, "warning") as warning:
    source = open_source(path)
  assert source.patient_grouping == grouping
  if grouping == "one_per_image":
    assert len(set(source.patient_ids)) == 8
    (message, where), _ = warning.call_args
    assert warning.call_count == 1 and where == str(path)
    assert "every image is its own patient; pass patient_ids" in message % where
  else:
    warning.assert_not_called()
  assert pickle.loads(pickle.dumps(source)).patient_grouping == grouping


def test_other_sources_record_their_patient_grouping(tmp_path, crops):
  from prosona_jax.data.synthetic import SyntheticSource  # pylint: disable=g-import-not-at-top
  assert SyntheticSource(num_images=4, num_patients=2, image_size=16).patient_grouping == (
      "given")
  _nifti_set(tmp_path, np.random.default_rng(4))
  assert open_source(tmp_path, rater_names=("r1", "r2"), image_size=16).patient_grouping == (
      "given")
  # The six LIDC samples come from six scans: the key prefixes group nothing.
  assert open_source(crops).patient_grouping == "one_per_image"
  rng = np.random.default_rng(0)
  records = {f"p{i // 3}_slice{i}": _record(rng) for i in range(6)}
  assert open_source(_write(tmp_path, records, "grouped.pkl")).patient_grouping == (
      "derived_from_keys")


def test_unknown_format_and_missing_path_are_errors(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(DataError, match="unknown format"):
    open_source(tmp_path / "notes.txt")
  with pytest.raises(DataError, match="unknown format 'hdf5'"):
    open_source(tmp_path / "notes.txt", "hdf5")
  for fmt in ("auto", "lidc_crops", "npz", "folder"):
    with pytest.raises(DataError, match="no such") as e:
      open_source(tmp_path / "missing.pkl", fmt)
    assert "missing.pkl" in str(e.value)


def test_source_from_config_checks_the_config(tmp_path):
  cfg = config_defaults.base_config().data
  cfg.synthetic.num_images, cfg.image_size = 6, 16
  source = source_from_config(cfg)
  assert len(source) == 6 and source.image_shape == (16, 16, 1)
  cfg.format, cfg.path = "npz", str(_npz(tmp_path, images=np.zeros((2, 16, 16)),
                                         masks=np.zeros((2, 3, 16, 16))))
  with pytest.raises(DataError, match="3 raters per image.*num_raters=4"):
    source_from_config(cfg)


def _nifti(path, data):
  import nibabel as nib  # pylint: disable=g-import-not-at-top
  nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))


def _nifti_set(root, rng, raters=("r1", "r2")):
  """Case A: a (20, 12, 3) volume; case B: a 2-D (16, 16) image."""
  shapes = {"caseA": (20, 12, 3), "caseB": (16, 16)}
  masks = {}
  for case, shape in shapes.items():
    (root / case).mkdir(parents=True)
    _nifti(root / case / "image.nii.gz", rng.normal(100, 20, shape).astype(np.float32))
    masks[case] = [(rng.random(shape) < 0.3).astype(np.uint8) for _ in raters]
    for name, m in zip(raters, masks[case]):
      _nifti(root / case / f"{name}.nii.gz", m)
  return masks


def test_folder_of_nifti_volumes(tmp_path):
  masks = _nifti_set(tmp_path, np.random.default_rng(4))
  source = open_source(tmp_path, rater_names=("r1", "r2"), image_size=16)
  assert detect_format(tmp_path) == "folder" and not source.order_raters_by_area
  assert source.keys == ["caseA_slice0", "caseA_slice1", "caseA_slice2", "caseB_slice0"]
  assert source.patient_ids == ["caseA"] * 3 + ["caseB"]
  item = source[1]
  assert item["image"].shape == (16, 16, 1) and item["masks"].shape == (2, 16, 16)
  assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
  # Centre crop 20 -> 16 rows (offset 2), zero pad 12 -> 16 columns (offset 2).
  np.testing.assert_array_equal(item["masks"][1, :, 2:14], masks["caseA"][1][2:18, :, 1])
  assert not item["masks"][:, :, :2].any() and not item["masks"][:, :, 14:].any()
  np.testing.assert_array_equal(source[3]["masks"][0], masks["caseB"][0])
  resampled = open_source(tmp_path, rater_names=("r1", "r2"), image_size=10,
                          resize="resample")
  assert resampled[0]["masks"].shape == (2, 10, 10)
  assert set(np.unique(resampled[0]["masks"]).tolist()) <= {0, 1}


@pytest.mark.parametrize("breakage,expected", [
    ("missing_rater", "missing the mask of rater 'r2'"),
    ("shape", r"'r1': mask shape \(16, 15\) differs"),
    ("values", r"'r1': masks must be in \{0, 1\}"),
    ("nan", "NaN or infinite"),
])
def test_folder_bad_input_is_an_error(tmp_path, breakage, expected):
  _nifti_set(tmp_path, np.random.default_rng(5))
  case = tmp_path / "caseB"
  if breakage == "missing_rater":
    (case / "r2.nii.gz").unlink()
  elif breakage == "shape":
    _nifti(case / "r1.nii.gz", np.zeros((16, 15), np.uint8))
  elif breakage == "values":
    _nifti(case / "r1.nii.gz", np.full((16, 16), 2, np.uint8))
  else:
    _nifti(case / "image.nii.gz", np.full((16, 16), np.nan, np.float32))
  with pytest.raises(DataError, match=expected) as e:
    open_source(tmp_path, rater_names=("r1", "r2"), image_size=16)
  assert "caseB" in str(e.value)


def test_folder_of_png_slices(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  expected = {}
  for folder, key in [("solo", "solo_slice0"), ("vol/slice7", "vol_slice7"),
                      ("vol/slice3", "vol_slice3")]:
    (tmp_path / folder).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(
        tmp_path / folder / "scan.png")
    expected[key] = [(rng.random((12, 12)) < 0.4).astype(np.uint8) for _ in range(3)]
    expected[key][1][:] = 0 if key == "vol_slice3" else expected[key][1]
    for r, m in enumerate(expected[key]):
      Image.fromarray(m * 255).save(tmp_path / folder / f"rater{r + 1}.png")  # {0, 255}.
  names = ("rater1", "rater2", "rater3")
  source = open_source(tmp_path, "folder", rater_names=names, image_name="scan",
                       image_size=12)
  assert source.keys == ["solo_slice0", "vol_slice3", "vol_slice7"]
  assert source.patient_ids == ["solo", "vol", "vol"]
  for i, key in enumerate(source.keys):
    np.testing.assert_array_equal(source[i]["masks"], np.stack(expected[key]))
  ordered = open_source(tmp_path, rater_names=names, image_name="scan", image_size=12,
                        order_raters_by_area=True)
  assert np.all(np.diff(ordered.mask_areas(), axis=1) >= 0)
  assert ordered[1]["masks"][0].sum() == 0  # The empty rater-2 mask comes first.


def test_folder_skip_empty_slices(tmp_path):
  masks = _nifti_set(tmp_path, np.random.default_rng(7))
  volume = np.zeros((20, 12, 3), np.uint8)
  volume[5, 5, 2] = 1  # Only slice 2 of case A has a mask pixel.
  for name in ("r1", "r2"):
    _nifti(tmp_path / "caseA" / f"{name}.nii.gz", volume)
  source = open_source(tmp_path, rater_names=("r1", "r2"), image_size=16,
                       skip_empty_slices=True)
  assert source.keys == ["caseA_slice2", "caseB_slice0"]
  assert masks["caseB"][0].any()
