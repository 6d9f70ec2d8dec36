"""D-Persona checkpoints import exactly: PyTorch vs the converted JAX model, and numpy paths.

The PyTorch model is `prosona_jax.testing.dpersona_torch` (after D-Persona's
lib/DPersona.py, smp 0.3.3's Unet with a ResNet-34 encoder, or the Probabilistic U-Net's
own U-Net), with its tensor names, small Gaussian encoders and random weights and
BatchNorm statistics.
"""

import json
import os

import jax
import numpy as np
import pytest

from prosona_jax import converter as convert
from prosona_jax import inference
from prosona_jax import predictor as predict
from prosona_jax.models import prob_unet
from configs import tiny
from conftest import missing

SIZE, LATENT, RATERS = 32, 6, 4
GAUSS = (4, 8, 16)


def _config(backbone: str):
  c = tiny.get_config()
  c.model.backbone = backbone  # Overwritten from the tensors; checks that it is.
  return c


def _relerr(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def _torch_dpersona(torch, backbone: str):
  """D-Persona (`original_backbone` False: smp Unet-ResNet34; True: plain U-Net), small
  Gaussian encoders, random BatchNorm statistics, eval mode."""
  from prosona_jax.testing import dpersona_torch  # pylint: disable=g-import-not-at-top
  net = dpersona_torch.build(backbone, latent_dim=LATENT, num_raters=RATERS,
                             gaussian_filters=GAUSS, unet_filters=(16, 32))
  with torch.no_grad():
    for mod in net.modules():
      if isinstance(mod, torch.nn.BatchNorm2d):  # Non-trivial eval-mode statistics.
        mod.weight.uniform_(0.5, 1.5)
        mod.bias.normal_(0.0, 0.1)
        mod.running_mean.normal_(0.0, 0.1)
        mod.running_var.uniform_(0.5, 1.5)
  return net.eval()


@pytest.mark.parametrize("backbone", ["unet", "resnet34"])
def test_converted_model_matches_pytorch(backbone, tmp_path):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    missing("torch is not installed (bash scripts/setup.sh --torch installs the "
                     "CPU wheel)")
  net = _torch_dpersona(torch, backbone)
  path = str(tmp_path / "DPersona1_LIDC_0_best.pth")
  torch.save({"model": net.state_dict()}, path)  # As D-Persona's train_dp.py saves.

  config, weights, unused = convert.convert_state_dict(convert.read_checkpoint(path),
                                                       _config(backbone))
  assert config.model.backbone == backbone and config.model.posterior_input == "all"
  assert tuple(config.model.gaussian_filters) == GAUSS and config.model.feature_channels == 16
  assert unused and all(k.startswith("proj_heads.") or k.endswith("num_batches_tracked")
                        for k in unused)

  rng = np.random.default_rng(0)
  x = rng.random((2, SIZE, SIZE, 1), np.float32)
  masks = (rng.random((2, RATERS, SIZE, SIZE)) > 0.5).astype(np.float32)
  z = rng.normal(size=(2, LATENT)).astype(np.float32)
  with torch.no_grad():
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    t_feats = net.unet(xt)
    t_prior = net.prior(xt)
    t_post = net.posterior(torch.cat([xt, torch.from_numpy(masks)], 1))
    t_logits = net.fcomb(t_feats, torch.from_numpy(z))[:, 0]

  model = prob_unet.build_from_config(config)
  frozen, _ = inference.split_weights(weights)
  feats = jax.jit(lambda v, x: model.apply(v, x, False, method="features"))(frozen, x)
  mu, log_sigma = model.apply(frozen, x, method="prior_dist")
  pmu, plog = model.apply(frozen, x, np.moveaxis(masks, 1, -1), method="posterior_dist")
  logits = model.apply(frozen, feats, z, method="decode")
  errors = {"features": _relerr(feats, t_feats.permute(0, 2, 3, 1)),
            "prior_mu": _relerr(mu, t_prior[0]), "prior_log_sigma": _relerr(log_sigma, t_prior[1]),
            "posterior_mu": _relerr(pmu, t_post[0]),
            "posterior_log_sigma": _relerr(plog, t_post[1]),
            "fcomb_logits": _relerr(logits, t_logits)}
  assert max(errors.values()) < 1e-4, errors

  if backbone == "unet":  # The CLI path too: .pth -> export folder -> serialized functions.
    out = str(tmp_path / "model")
    summary = convert.convert(path, out, _config(backbone), platforms=["cpu"])
    assert summary["kind"] == "dpersona"
    from prosona_jax import model_loader
    loaded = model_loader.load_export(out)
    assert not loaded.has_projector
    e_mu, e_log = loaded.fns["prior"](x)
    e_logits = loaded.fns["decode"](x, z[:, None])[:, 0]
    assert _relerr(e_mu, t_prior[0]) < 1e-4 and _relerr(e_log, t_prior[1]) < 1e-4
    assert _relerr(e_logits, t_logits) < 1e-4


def _numpy_plain_unet_state(rng, filters=(8, 16)) -> dict:
  """A D-Persona `original_backbone=True` state dict, written without torch."""
  state = {}

  def conv(name, cout, cin, k=3):
    state[f"{name}.weight"] = rng.normal(0, 0.2, (cout, cin, k, k)).astype(np.float32)
    state[f"{name}.bias"] = rng.normal(0, 0.1, (cout,)).astype(np.float32)

  for i, f in enumerate(filters):
    cin = 1 if i == 0 else filters[i - 1]
    for k in range(3):
      conv(f"unet.contracting_path.{i}.layers.{(i > 0) + 2 * k}", f, cin if k == 0 else f)
  conv("unet.upsampling_path.0.conv_block.layers.0", filters[0], filters[0] + filters[1])
  for k in (1, 2):
    conv(f"unet.upsampling_path.0.conv_block.layers.{2 * k}", filters[0], filters[0])
  for net, cin in (("prior", 1), ("posterior", 2)):
    idx = 0
    for i, f in enumerate(GAUSS):
      idx += i > 0
      for k in range(3):
        conv(f"{net}.encoder.layers.{idx}", f, (cin if i == 0 else GAUSS[i - 1]) if k == 0 else f)
        idx += 2
    conv(f"{net}.conv_layer", 2 * LATENT, GAUSS[-1], 1)
  for j, cin in enumerate((filters[0] + LATENT, filters[0], filters[0])):
    conv(f"fcomb.layers.{2 * j}", filters[0], cin, 1)
  conv("fcomb.last_layer", 1, filters[0], 1)
  state["proj_heads.multi_expert_heads.0.layers.0.weight"] = np.zeros((6, 8, 3, 3), np.float32)
  return state


def test_numpy_state_dict_converts_and_predicts_without_torch(tmp_path):
  from safetensors.numpy import save_file
  state = _numpy_plain_unet_state(np.random.default_rng(1))
  ckpt = str(tmp_path / "dpersona.safetensors")
  save_file(state, ckpt)
  out = str(tmp_path / "model")
  summary = convert.convert(ckpt, out, _config("resnet34"), platforms=["cpu"])
  assert summary["unused"] == ["proj_heads.multi_expert_heads.0.layers.0.weight"]
  with open(os.path.join(out, "config.json")) as f:
    meta = json.load(f)
  assert meta["model"]["backbone"] == "unet" and meta["model"]["unet_filters"] == [8, 16]
  assert meta["model"]["posterior_input"] == "one_random" and meta["stage2"] is None
  assert "prompt_probs" not in meta["functions"]
  from safetensors.numpy import load_file
  w = load_file(os.path.join(out, "params.safetensors"))
  # Kernels are OIHW -> HWIO; 1x1 convs become dense (I, O) kernels.
  np.testing.assert_array_equal(w["params/prior/level1_conv0/kernel"],
                                state["prior.encoder.layers.7.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(w["params/backbone/up0_conv2/kernel"],
                                state["unet.upsampling_path.0.conv_block.layers.4.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(w["params/fcomb/last/kernel"],
                                state["fcomb.last_layer.weight"][:, :, 0, 0].T)

  image = np.random.default_rng(2).random((40, 24)).astype(np.float32)
  np.save(tmp_path / "scan.npy", image)
  manifest = predict.run(predict.Options(out=str(tmp_path / "pred"), model=out,
                                         inputs=[str(tmp_path / "scan.npy")], samples=3))
  probs = np.load(tmp_path / "pred" / "scan_probs.npy")
  assert probs.shape == (3, 40, 24) and manifest["mode"] == "samples"
  assert (tmp_path / "pred" / "scan_sample2.npy").is_file()
  with pytest.raises(inference.InferenceError, match="no Stage-2 projector"):
    predict.run(predict.Options(out=str(tmp_path / "p2"), model=out,
                                inputs=[str(tmp_path / "scan.npy")]))


def test_conversion_errors_name_the_tensor(tmp_path):
  state = _numpy_plain_unet_state(np.random.default_rng(1))
  del state["fcomb.last_layer.bias"]
  with pytest.raises(inference.InferenceError, match="fcomb.last_layer.bias"):
    convert.convert_state_dict(state, _config("unet"))
  state = _numpy_plain_unet_state(np.random.default_rng(1))
  state["prior.conv_layer.bias"] = np.zeros((5,), np.float32)
  with pytest.raises(inference.InferenceError, match="prior.conv_layer.bias"):
    convert.convert_state_dict(state, _config("unet"))
  with pytest.raises(inference.InferenceError, match="no D-Persona backbone"):
    convert.convert_state_dict({"encoder.weight": np.zeros((1,))}, _config("unet"))


def test_torchvision_resnet_becomes_encoder_safetensors(tmp_path):
  from safetensors.numpy import load_file, save_file
  from prosona_jax.models import pretrained
  # The names torchvision uses; shapes do not matter to the file conversion itself.
  names = [n for _, p, kind in pretrained._torch_name_pairs()  # pylint: disable=protected-access
           for n in ([f"{p}.weight"] if kind == "conv" else
                     [f"{p}.{s}" for s in ("weight", "bias", "running_mean", "running_var")])]
  state = {n: np.ones((2,), np.float32) for n in names}
  state.update({"fc.weight": np.ones((3, 2), np.float32),
                "bn1.num_batches_tracked": np.ones((), np.float32)})
  src = str(tmp_path / "resnet34.safetensors")
  save_file(state, src)
  out = str(tmp_path / "enc.safetensors")
  assert convert.convert(src, out)["kind"] == "torchvision_resnet"
  assert set(load_file(out)) == set(names)


def _bad_checkpoints(tmp_path):
  """(path, message) of checkpoints that are not readable state dicts."""
  from safetensors.numpy import save_file
  objects = str(tmp_path / "objects.npz")
  np.savez(objects, weight=np.array([{"a": 1}, None], dtype=object))
  good = str(tmp_path / "good.safetensors")
  save_file({"w": np.ones((64, 64), np.float32)}, good)
  truncated = str(tmp_path / "truncated.safetensors")
  with open(good, "rb") as f:
    data = f.read()
  with open(truncated, "wb") as f:
    f.write(data[:len(data) // 2])
  garbage = str(tmp_path / "garbage.safetensors")
  with open(garbage, "wb") as f:
    f.write(b"\xff" * 64)
  zipped_garbage = str(tmp_path / "garbage.npz")
  with open(zipped_garbage, "wb") as f:
    f.write(b"PK\x03\x04" + b"\x00" * 60)
  return [(objects, r"'weight': object array \(dtype object\) refused"),
          (truncated, "not a readable .safetensors file"),
          (garbage, "not a readable .safetensors file"),
          (zipped_garbage, "not a .npz|not a readable")]


def test_unreadable_checkpoints_are_errors_naming_the_file(tmp_path):
  good = str(tmp_path / "good.npz")
  np.savez(good, **{"module.w": np.arange(6.0).reshape(2, 3)})
  np.testing.assert_array_equal(convert.read_checkpoint(good)["w"],
                                np.arange(6.0).reshape(2, 3))
  for path, message in _bad_checkpoints(tmp_path):
    with pytest.raises(inference.InferenceError, match=message) as e:
      convert.read_checkpoint(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_cli_reports_an_unreadable_checkpoint_in_one_line(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  for path, _ in _bad_checkpoints(tmp_path)[:2]:
    proc = subprocess.run([sys.executable, "-m", "prosona_jax.convert", f"--checkpoint={path}",
                           f"--out={tmp_path / 'out'}"], cwd=os.path.dirname(
                               os.path.dirname(__file__)), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.startswith("convert: error: ")]
    assert len(lines) == 1 and path in lines[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out")
