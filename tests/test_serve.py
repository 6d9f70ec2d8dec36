"""The review app (`serve`): its operations, caching, safety, HTTP API and command line.

`webapp.Service` is tested in-process (it needs no web framework). The HTTP tests talk to
`python -m prosona_jax.serve` started on a free port (`serve_url`, conftest); they need
the `serve` extra, and skip without it (fail under CI=true). Masks come from
`styles_export`, a small model whose prompts choose between a conservative and an
inclusive style, so that two prompts give visibly different masks.
"""

import base64
import http.client
import io
import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from conftest import STYLE_CORE, STYLE_MARGIN, missing, serve_extra_missing
from prosona_jax import model_loader
from prosona_jax import predictor
from prosona_jax import webapp
from prosona_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FREE_TEXT = "include the faint zone with a generous margin"  # Not a bank phrasing.


def synthetic_png(index: int = 207, canvas: tuple[int, int] | None = None) -> bytes:
  """A synthetic 32x32 image (a lesion with a faint zone) as PNG bytes, optionally placed
  in a larger dark canvas (then the model runs as a sliding window)."""
  image, _ = synthetic.generate_item(0, index, 16, 32, 4)
  pixels = np.uint8(np.round(image * 255))
  if canvas:
    big = np.full(canvas, pixels.min(), np.uint8)
    big[3:35, 5:37] = pixels
    pixels = big
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, "PNG")
  return buf.getvalue()


def _array(b64: str) -> np.ndarray:
  data = base64.b64decode(b64)
  if data.startswith(b"\x89PNG"):
    return np.asarray(Image.open(io.BytesIO(data)))
  return np.load(io.BytesIO(data))


@pytest.fixture(scope="module")
def service(styles_export):
  svc = webapp.Service(model_loader.load_export(styles_export), num_samples=6)
  yield svc
  svc.close()


class _Counting:
  """Wraps a callable and counts its calls."""

  def __init__(self, fn):
    self.fn, self.calls = fn, 0

  def __call__(self, *args):
    self.calls += 1
    return self.fn(*args)


# ---------------------------------------------------------------- the service
def test_prompts_choose_styles_and_equal_predicts_masks(service, styles_export, tmp_path):
  data = synthetic_png(canvas=(40, 48))  # Larger than the model: sliding window.
  image = service.add_upload("lesion.png", data)
  assert image["slices"] == 1 and image["shape"] == [40, 48] and image["mask_format"] == ".png"
  assert "sliding window" in image["plan"]
  out = service.predict(image["image_id"], [STYLE_CORE, STYLE_MARGIN, FREE_TEXT],
                        return_probs=True)
  core, margin, free = out["masks"]
  assert [m["embedding"] for m in out["masks"]] == ["bank", "bank", "text encoder"]
  assert 5 <= core["area"] < margin["area"], (core["area"], margin["area"])
  for m in out["masks"]:  # The PNG is the mask, pixel for pixel, and the area its sum.
    mask = _array(m["mask_png"])
    np.testing.assert_array_equal(mask, _array(m["probs_npy"]) > 0.5)
    assert mask.shape == (40, 48) and mask.sum() == m["area"]
  # The same masks as `predict` writes for that file.
  (tmp_path / "lesion.png").write_bytes(data)
  predictor.run(predictor.Options(out=str(tmp_path / "out"), model=styles_export,
                                  inputs=[str(tmp_path / "lesion.png")],
                                  prompts=[STYLE_CORE, STYLE_MARGIN, FREE_TEXT]))
  written = np.load(tmp_path / "out" / "lesion_probs.npy")
  for j, m in enumerate(out["masks"]):
    np.testing.assert_allclose(_array(m["probs_npy"]), written[j], atol=1e-6)


def test_a_prompt_change_runs_only_the_projector_and_fcomb(styles_export):
  model = model_loader.load_export(styles_export)
  encode = model.fns["encode"] = _Counting(model.fns["encode"])
  decode = model.fns["decode_prompts"] = _Counting(model.fns["decode_prompts"])
  svc = webapp.Service(model)
  embed = svc.embedder = _Counting(svc.embedder)
  image = svc.add_upload("a.png", synthetic_png())["image_id"]
  svc.predict(image, [STYLE_CORE])
  assert (encode.calls, decode.calls) == (1, 1)
  out = svc.predict(image, [STYLE_CORE, STYLE_MARGIN])
  assert (encode.calls, decode.calls) == (1, 2)  # Only the new prompt is decoded.
  a, b = (_array(m["mask_png"]) for m in out["masks"])
  ends = [svc.interpolate(image, [STYLE_CORE, STYLE_MARGIN], alpha, return_probs=True)
          for alpha in (0.0, 0.4, 1.0)]
  assert (encode.calls, decode.calls) == (1, 5)
  np.testing.assert_array_equal(_array(ends[0]["mask_png"]), a)  # The slider's ends are
  np.testing.assert_array_equal(_array(ends[2]["mask_png"]), b)  # the two prompts.
  svc.interpolate(image, [STYLE_CORE, STYLE_MARGIN], 0.4)  # Back to a position: cached.
  calls = embed.calls
  svc.predict(image, [FREE_TEXT])
  svc.predict(image, [FREE_TEXT, STYLE_CORE])
  assert embed.calls == calls + 1  # Free text is embedded once.
  svc.samples(image, 4)
  svc.add_upload("a.png", synthetic_png())  # The same upload again: the same image.
  svc.predict(image, [STYLE_MARGIN], threshold=0.3)  # Another threshold: no model call.
  assert (encode.calls, decode.calls) == (1, 6)
  svc.close()


def test_stage1_samples_are_sorted_by_area(service):
  image = service.add_upload("a.png", synthetic_png())["image_id"]
  out = service.samples(image, 6)["samples"]
  areas = [s["area"] for s in out]
  assert areas == sorted(areas) and areas[0] < areas[-1]
  assert sorted(s["sample"] for s in out) == list(range(6))
  assert all(_array(s["mask_png"]).sum() == s["area"] for s in out)


def test_volume_slices_and_downloads_keep_the_nifti_geometry(service, tmp_path):
  rng = np.random.default_rng(0)
  vol = rng.normal(40.0, 300.0, (24, 20, 3)).astype(np.int16)
  affine = np.array([[0.7, 0, 0, 10], [0, 2.5, 0, -4], [0, 0, 3.0, 3], [0, 0, 0, 1]])
  img = nib.Nifti1Image(vol, affine)
  img.header["descrip"] = b"test scan"
  nib.save(img, tmp_path / "scan.nii.gz")
  image = service.add_upload("scan.nii.gz", (tmp_path / "scan.nii.gz").read_bytes())
  assert image["slices"] == 3 and image["axis"] == 2 and image["mask_format"] == ".nii.gz"
  with pytest.raises(webapp.ServeError, match="3 slice"):
    service.predict(image["image_id"], [STYLE_CORE], slice_index=3)
  shown = service.predict(image["image_id"], [STYLE_CORE, STYLE_MARGIN], slice_index=1,
                          threshold=0.3, return_probs=True)["masks"]
  name, media, data = service.download(image["image_id"], [STYLE_CORE, STYLE_MARGIN],
                                       "probs")
  assert name == "scan_probs.npy" and media == "application/octet-stream"
  probs = np.load(io.BytesIO(data))
  assert probs.shape == (2, 24, 20, 3)
  for j in range(2):  # The whole-volume pass equals the cached slice's.
    np.testing.assert_allclose(probs[j, :, :, 1], _array(shown[j]["probs_npy"]), atol=1e-6)
  name, media, data = service.download(image["image_id"], [STYLE_CORE, STYLE_MARGIN],
                                       "masks", threshold=0.3)
  assert name == "scan_masks.zip" and media == "application/zip"
  with zipfile.ZipFile(io.BytesIO(data)) as zf:
    assert sorted(zf.namelist()) == ["prompts.json", "scan_prompt0.nii.gz",
                                     "scan_prompt1.nii.gz"]
    zf.extractall(tmp_path / "dl")
  listing = json.loads((tmp_path / "dl" / "prompts.json").read_text())
  assert [m["prompt"] for m in listing["masks"]] == [STYLE_CORE, STYLE_MARGIN]
  for j in range(2):
    mask = nib.load(tmp_path / "dl" / f"scan_prompt{j}.nii.gz")
    assert mask.shape == vol.shape and mask.header["descrip"] == b"test scan"
    np.testing.assert_allclose(mask.affine, affine)
    np.testing.assert_array_equal(np.asarray(mask.dataobj), probs[j] > 0.3)


def test_bad_uploads_are_errors_and_the_service_goes_on(service):
  with pytest.raises(webapp.ServeError, match=r"^x\.png: not a readable PNG") as e:
    service.add_upload("../../etc/x.png", b"garbage")
  assert "prosona_serve_" not in str(e.value)  # Names the upload, not the server's file.
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                "shape": (100000, 100000)})
  with pytest.raises(webapp.ServeError, match="declares 10000000000 values"):
    service.add_upload("huge.npy", header.getvalue())
  with pytest.raises(webapp.ServeError, match="empty upload"):
    service.add_upload("a.png", b"")
  with pytest.raises(webapp.ServeError, match="upload limit"):
    service.add_upload("a.npy", b"\0" * (service.max_upload_bytes + 1))
  assert not os.listdir(service._tmp)  # pylint: disable=protected-access  # Nothing kept.
  image = service.add_upload("a.png", synthetic_png())
  assert service.predict(image["image_id"], [STYLE_MARGIN])["masks"][0]["area"] > 0


@pytest.mark.parametrize("call,message", [
    (lambda s, i: s.add_case("synth0000"), "start the app with --workdir"),
    (lambda s, i: s.predict("0123456789abcdef", [STYLE_CORE]), "no image"),
    (lambda s, i: s.predict(i, STYLE_CORE), "expected a list"),
    (lambda s, i: s.predict(i, ["x"] * 17), "at most 16"),
    (lambda s, i: s.predict(i, ["  "]), "non-empty"),
    (lambda s, i: s.predict(i, [STYLE_CORE], threshold=1.5), r"\(0, 1\)"),
    (lambda s, i: s.predict(i, [STYLE_CORE], slice_index=True), "integer"),
    (lambda s, i: s.interpolate(i, [STYLE_CORE], 0.5), "exactly two"),
    (lambda s, i: s.interpolate(i, [STYLE_CORE, STYLE_MARGIN], 2), r"\[0, 1\]"),
    (lambda s, i: s.samples(i, 65), "1 to 64"),
    (lambda s, i: s.download(i, [STYLE_CORE], "weights"), "'masks' or 'probs'"),
])
def test_bad_requests_are_one_line_errors(service, call, message):
  image = service.add_upload("a.png", synthetic_png())["image_id"]
  with pytest.raises(webapp.ServeError, match=message):
    call(service, image)


def test_test_fold_cases_show_raters_and_the_best_match(tiny_run):
  from prosona_jax.data import sources, splits
  model, config = model_loader.load_workdir(tiny_run)
  svc = webapp.Service(model, run_config=config)
  source = sources.source_from_config(config.data)
  split = splits.make_split(source.patient_ids, fold=0, num_folds=config.data.num_folds,
                            seed=config.data.split_seed, level=config.data.split_level,
                            val_fraction=config.data.val_fraction)
  keys = svc.cases()["keys"]
  assert keys == [source.keys[i] for i in split.test] and svc.info()["cases"]["count"] == len(keys)
  case = svc.add_case(keys[0])
  record = source[int(split.test[0])]
  assert [r["label"] for r in case["raters"]] == list(config.data.rater_names)
  for r, m in zip(case["raters"], record["masks"]):
    np.testing.assert_array_equal(_array(r["mask_png"]), m > 0)
  out = svc.predict(case["image_id"], [STYLE_CORE], threshold=0.49)["masks"][0]
  mask = _array(out["mask_png"]).astype(bool)
  dices = [webapp.dice(mask, m > 0) for m in record["masks"]]
  assert [d["dice"] for d in out["rater_dice"]] == pytest.approx(dices, abs=1e-4)
  assert out["best_rater"]["label"] == config.data.rater_names[int(np.argmax(dices))]
  with pytest.raises(webapp.ServeError, match="not in test fold 0"):
    svc.add_case(source.keys[int(split.train[0])])  # Only the test fold, by key.
  svc.close()


def test_dice_and_mask_png():
  a = np.zeros((4, 5), bool)
  a[1:3, 1:4] = True
  b = np.zeros((4, 5), bool)
  b[1:3, 2:5] = True
  assert webapp.dice(a, b) == pytest.approx(2 * 4 / 12)
  assert webapp.dice(a & False, b & False) == 1.0
  png = Image.open(io.BytesIO(webapp.mask_png(a)))
  assert png.mode == "P" and np.array_equal(np.asarray(png), a)
  assert png.convert("RGBA").getpixel((0, 0))[3] == 0  # Background: transparent.


# ---------------------------------------------------------------- HTTP and command line
def _request(url: str, data: bytes | None = None, content_type: str | None = None,
             headers: dict | None = None) -> tuple[int, dict, bytes]:
  req = urllib.request.Request(url, data=data, headers=dict(headers or {}))
  if content_type:
    req.add_header("Content-Type", content_type)
  try:
    with urllib.request.urlopen(req, timeout=120) as r:
      return r.status, dict(r.headers), r.read()
  except urllib.error.HTTPError as e:
    return e.code, dict(e.headers), e.read()


def _post(url: str, body: dict) -> tuple[int, dict]:
  status, _, data = _request(url, json.dumps(body).encode(), "application/json")
  return status, json.loads(data)


def _upload(base: str, name: str, data: bytes) -> tuple[int, dict]:
  status, _, out = _request(f"{base}api/images?filename={name}", data,
                            "application/octet-stream")
  return status, json.loads(out)


def test_json_api_gives_two_masks_of_different_area(serve_url):
  status, info = _request(serve_url + "api/info")[::2]
  info = json.loads(info)
  assert status == 200 and info["free_text"] and STYLE_CORE in info["default_prompts"]
  status, image = _upload(serve_url, "lesion.png", synthetic_png())
  assert status == 200, image
  status, out = _post(serve_url + "api/predict", {"image_id": image["image_id"],
                                                  "prompts": [STYLE_CORE, FREE_TEXT]})
  assert status == 200, out
  core, free = out["masks"]
  assert core["embedding"] == "bank" and free["embedding"] == "text encoder"
  assert core["area"] != free["area"] and free["area"] > 0
  status, out = _post(serve_url + "api/interpolate", {
      "image_id": image["image_id"], "prompts": [STYLE_CORE, STYLE_MARGIN], "alpha": 1})
  assert status == 200 and out["area"] > core["area"], out
  status, out = _post(serve_url + "api/samples", {"image_id": image["image_id"]})
  assert status == 200 and len(out["samples"]) == 6  # --samples=6
  status, headers, data = _request(serve_url + "api/download", json.dumps(
      {"image_id": image["image_id"], "prompts": [STYLE_CORE], "what": "masks"}).encode(),
                                   "application/json")
  assert status == 200 and 'filename="lesion_masks.zip"' in headers["content-disposition"]
  assert zipfile.ZipFile(io.BytesIO(data)).namelist() == ["lesion_prompt0.png", "prompts.json"]
  status, headers, data = _request(f"{serve_url}api/images/{image['image_id']}/slices/0.png")
  assert status == 200 and data.startswith(b"\x89PNG")


def test_a_bad_upload_is_an_error_and_the_server_keeps_serving(serve_url):
  status, out = _upload(serve_url, "garbage.png", b"not an image")
  assert status == 400 and out["error"].startswith("garbage.png: not a readable PNG"), out
  status, out = _upload(serve_url, "lesion.png", synthetic_png(5))
  assert status == 200 and out["shape"] == [32, 32], out
  status, out = _post(serve_url + "api/predict", {"image_id": out["image_id"],
                                                  "prompts": [STYLE_MARGIN]})
  assert status == 200 and out["masks"][0]["area"] > 0


@pytest.mark.parametrize("what,expected", [
    ("too large", (413, "upload limit")),
    ("form post", (415, "application/octet-stream")),
    ("text json", (415, "application/json")),
    ("foreign host", (400, None)),
    ("a path", (404, "Not Found")),
    ("bad field", (400, "field 'prompts'")),
])
def test_uploads_are_limited_and_foreign_requests_refused(serve_url, what, expected):
  if what == "too large":  # The server runs with --max_upload_mb=1: refused unread.
    host, port = urllib.parse.urlsplit(serve_url).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", "/api/images?filename=a.npy")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str((1 << 20) + 1))
    conn.endheaders()
    response = conn.getresponse()
    got = response.status, None, response.read()
    conn.close()
  elif what == "form post":  # What another site's page could send without asking.
    got = _request(serve_url + "api/images", b"x", "text/plain")
  elif what == "text json":
    got = _request(serve_url + "api/predict", b"{}", "text/plain")
  elif what == "foreign host":  # DNS rebinding: a page of evil.example on our address.
    got = _request(serve_url + "api/info", headers={"Host": "evil.example"})
  elif what == "a path":
    got = _request(serve_url + "api/images/..%2F..%2Fetc%2Fpasswd/slices/0.png")
  else:
    got = _request(serve_url + "api/predict", b'{"image_id": "x", "prompts": "a"}',
                   "application/json")
  status, _, body = got
  assert status == expected[0], body
  if expected[1]:
    assert expected[1] in json.loads(body)["error"]


def _serve_cli(*args, block_extra=False):
  """`python -m prosona_jax.serve ARGS`, optionally as if the serve extra were absent."""
  code = ("import runpy, sys\n"
          + ("sys.modules['starlette'] = sys.modules['uvicorn'] = None\n" if block_extra else "")
          + "sys.argv = ['serve'] + sys.argv[1:]\n"
          "runpy.run_module('prosona_jax.serve', run_name='__main__', alter_sys=True)\n")
  return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))


def test_without_the_extra_serve_says_how_to_install_it(tmp_path):
  proc = _serve_cli("--help", block_extra=True)
  assert proc.returncode == 0 and "--max_upload_mb" in proc.stdout, proc.stderr[-2000:]
  proc = _serve_cli(f"--model={tmp_path}", block_extra=True)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "pip install 'prosona_jax[serve]'" in lines[0] and "Traceback" not in proc.stderr


def test_another_host_warns_and_a_missing_model_is_one_line(tmp_path):
  reason = serve_extra_missing()
  if reason:
    missing(reason)
  proc = _serve_cli("--host=0.0.0.0", "--port=0", f"--model={tmp_path / 'none'}")
  assert proc.returncode == 2, proc.stderr
  assert "warning: listening on 0.0.0.0" in proc.stderr and "no authentication" in proc.stderr
  assert "no such model folder" in proc.stderr and "Traceback" not in proc.stderr
  proc = _serve_cli("--port=0")
  assert proc.returncode == 2 and "warning" not in proc.stderr
  assert "give exactly one of --model" in proc.stderr
