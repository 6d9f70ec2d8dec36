"""`predict`: NIfTI/PNG/DICOM/npy in, masks in the input's format and geometry out."""

import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from prosona_jax import predictor as predict
from prosona_jax.inference import InferenceError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BANK_A = "solid core only"
BANK_B = "core plus faint surrounding zone, generous margin"


def _run(out, **kw) -> dict:
  return predict.run(predict.Options(out=str(out), **kw))


def test_nifti_volume_gives_mask_volumes_with_its_affine_header_and_shape(tiny_export,
                                                                          tmp_path):
  rng = np.random.default_rng(0)
  vol = rng.normal(40.0, 300.0, (20, 3, 36)).astype(np.int16)
  affine = np.array([[0.7, 0, 0, 10], [0, 2.5, 0, -4], [0, 0, 0.7, 3], [0, 0, 0, 1]])
  img = nib.Nifti1Image(vol, affine)
  img.header["descrip"] = b"test scan"
  nib.save(img, tmp_path / "scan.nii.gz")
  m = _run(tmp_path / "out", model=tiny_export, inputs=[str(tmp_path / "scan.nii.gz")],
           prompts=[BANK_A, BANK_B], axis=1, normalize="none")
  probs = np.load(tmp_path / "out" / "scan_probs.npy")
  assert probs.shape == (2, 20, 3, 36)
  for j in range(2):
    mask = nib.load(tmp_path / "out" / f"scan_prompt{j}.nii.gz")
    assert mask.shape == vol.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, affine)
    assert mask.header["descrip"] == b"test scan"
    np.testing.assert_array_equal(mask.header.get_zooms(), img.header.get_zooms())
    np.testing.assert_array_equal(np.asarray(mask.dataobj), probs[j] > 0.5)
  assert (tmp_path / "out" / "scan_overlay.png").is_file()
  assert m["inputs"][0]["normalize"] == "none" and m["outputs"][1]["prompt"] == BANK_B
  # Slicing along axis 1 and writing back = predicting the same slices as an npy stack.
  np.save(tmp_path / "stack.npy", np.moveaxis(vol, 1, 0).astype(np.float32))
  _run(tmp_path / "out2", model=tiny_export, inputs=[str(tmp_path / "stack.npy")],
       prompts=[BANK_A, BANK_B], normalize="none")
  stack = np.load(tmp_path / "out2" / "stack_probs.npy")
  np.testing.assert_allclose(np.moveaxis(stack, 1, 2), probs, atol=1e-6)
  assert np.load(tmp_path / "out2" / "stack_prompt0.npy").shape == (3, 20, 36)


def _dicom(path, pixels: np.ndarray) -> None:
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = CTImageStorage
  meta.MediaStorageSOPInstanceUID = generate_uid()
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
  ds.Modality, ds.PatientID = "CT", "anon"
  ds.set_pixel_data(pixels, "MONOCHROME2", 16)
  ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
  ds.save_as(path, enforce_file_format=True)


def test_png_and_dicom_give_png_masks_and_overlays(tiny_export, tmp_path):
  rng = np.random.default_rng(1)
  grey = (rng.random((30, 50)) * 255).astype(np.uint8)
  Image.fromarray(grey).save(tmp_path / "slice.png")
  Image.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "colour.png")
  _dicom(tmp_path / "ct.dcm", (rng.random((48, 40)) * 2000).astype(np.uint16))
  inputs = [str(tmp_path / n) for n in ("slice.png", "colour.png", "ct.dcm")]
  m = _run(tmp_path / "out", model=tiny_export, inputs=inputs, threshold=0.0)
  out = tmp_path / "out"
  for stem, shape in (("slice", (30, 50)), ("colour", (30, 50)), ("ct", (48, 40))):
    mask = np.asarray(Image.open(out / f"{stem}_prompt3.png"))
    assert mask.shape == shape and set(np.unique(mask)) <= {0, 255}
    assert (out / f"{stem}_overlay.png").is_file()
    assert np.load(out / f"{stem}_probs.npy").shape == (4,) + shape
  # The whole 30x50 slice is seen: padded to 32 rows, two overlapping 32x32 tiles.
  probs = np.load(out / "slice_probs.npy")
  assert (probs > 0).all()
  assert m["inputs"][0]["resize"] == "sliding_window"
  assert m["inputs"][0]["geometry"]["tiles"] == 2
  assert m["inputs"][0]["geometry"]["padding"] == [[1, 1], [0, 0]]
  np.testing.assert_allclose(probs, np.load(out / "colour_probs.npy"), atol=1e-6)
  kinds = {e["kind"]: e["normalize"] for e in m["inputs"]}
  assert kinds == {"png": "unit (uint8 / 255)", "dicom": "robust"}
  _run(tmp_path / "res", model=tiny_export, inputs=inputs[:1], resize="resample")
  assert np.load(tmp_path / "res" / "slice_probs.npy").shape == (4, 30, 50)
  # --resize=crop_or_pad: the centre 32 columns of the 50; the margins get probability 0.
  m = _run(tmp_path / "crop", model=tiny_export, inputs=inputs[:1], resize="crop_or_pad")
  probs = np.load(tmp_path / "crop" / "slice_probs.npy")
  assert (probs[..., :9] == 0).all() and (probs[..., 9:41] > 0).all()
  assert m["inputs"][0]["resize"] == "crop_or_pad"


def test_workdir_mode_equals_export_mode_and_reads_dataset_keys(tiny_run, tiny_export,
                                                                tmp_path):
  image = np.random.default_rng(2).random((32, 32)).astype(np.float32)
  np.save(tmp_path / "x.npy", image)
  prompts = [BANK_A, "a small tight mask of the bright centre"]  # The second is free text.
  common = dict(inputs=[str(tmp_path / "x.npy")], prompts=prompts, seed=3)
  m = _run(tmp_path / "w", workdir=tiny_run, **common)
  _run(tmp_path / "m", model=tiny_export, **common)
  assert [o["embedding"] for o in m["outputs"]] == ["bank", "text encoder"]
  np.testing.assert_allclose(np.load(tmp_path / "w" / "x_probs.npy"),
                             np.load(tmp_path / "m" / "x_probs.npy"), atol=1e-5)
  m = _run(tmp_path / "k", workdir=tiny_run, keys=["synth0000_slice00000"], samples=3,
           interpolate=[BANK_A, BANK_B], interpolate_steps=5)
  assert m["mode"] == "samples"
  assert np.load(tmp_path / "k" / "synth0000_slice00000_probs.npy").shape == (3, 32, 32)
  for name in ("sample2.png", "overlay.png", "interpolation.png"):
    assert (tmp_path / "k" / f"synth0000_slice00000_{name}").is_file()
  assert np.load(tmp_path / "k" / "synth0000_slice00000_interpolation.npy").shape == (5, 32, 32)


def test_bad_inputs_and_models_get_errors_naming_them(tiny_export, tmp_path):
  np.save(tmp_path / "five.npy", np.zeros((2, 2, 2, 2, 2), np.float32))
  (tmp_path / "notes.png").write_text("not an image")
  (tmp_path / "blob.bin").write_bytes(b"\x00" * 300)
  good = tmp_path / "ok.npy"
  np.save(good, np.zeros((32, 32), np.float32))
  cases = [
      (dict(inputs=[str(tmp_path / "five.npy")]), r"five\.npy: array of shape"),
      (dict(inputs=[str(tmp_path / "notes.png")]), r"notes\.png: not a readable PNG"),
      (dict(inputs=[str(tmp_path / "blob.bin")]), r"blob\.bin: not a supported"),
      (dict(inputs=[str(tmp_path / "gone.nii.gz")]), "gone.nii.gz: no such file"),
      (dict(inputs=[str(good)], prompts=["zebra stripes"], text_encoder="none"),
       "'zebra stripes' is not in the model's prompt bank"),
      (dict(keys=["synth0000_slice00000"]), "--key reads the training run"),
      (dict(inputs=[str(good)], interpolate=[BANK_A]), "exactly two"),
      (dict(inputs=[str(good)], samples=2, prompts=[BANK_A]), "either --samples or --prompt"),
      (dict(model=str(tmp_path), inputs=[str(good)]), "not a prosona_jax export"),
  ]
  for kw, pattern in cases:
    with pytest.raises(InferenceError, match=pattern):
      _run(tmp_path / "out", **{"model": tiny_export, **kw})
  future = tmp_path / "future_model"
  shutil.copytree(tiny_export, future)
  with open(future / "config.json") as f:
    meta = json.load(f)
  meta["format_version"] = 99
  with open(future / "config.json", "w") as f:
    json.dump(meta, f)
  with pytest.raises(InferenceError, match=r"config\.json: field 'format_version' is 99"):
    _run(tmp_path / "out", model=str(future), inputs=[str(good)])
  # The command line reports the same errors as one line, without a traceback.
  proc = subprocess.run(
      [sys.executable, "-m", "prosona_jax.predict", f"--model={future}", f"--input={good}",
       f"--out={tmp_path / 'cli'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2  # A user mistake: cli.EXIT_USER_ERROR.
  assert "predict: " in proc.stderr and "format_version" in proc.stderr
  assert "Traceback" not in proc.stderr
