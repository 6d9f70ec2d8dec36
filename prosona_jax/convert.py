r"""Imports PyTorch weights: D-Persona Stage-1 checkpoints and torchvision ResNet-34.

  python -m prosona_jax.convert --checkpoint=DPersona1_LIDC_0_best.pth \
      --config=configs/lidc.py --out=models/dpersona_fold0
  python -m prosona_jax.convert --checkpoint=resnet34-b627a593.pth --out=resnet34.safetensors

A D-Persona checkpoint (`torch.save({'model': net.state_dict()})`, smp 0.3.3) becomes an
export folder like `prosona_jax.export` writes, with the Stage-1 functions only (`prior`,
`decode`: `predict --samples=N` works; D-Persona's per-rater heads are not ProSona's
projector and are skipped). Its tensor names:
- backbone `unet.seg_encoder.*` (torchvision ResNet-34 names) and
  `unet.seg_decoder.blocks.<i>.conv<k>.{0: conv, 1: BatchNorm}.*` (smp's U-Net), or with
  `original_backbone=True` the Probabilistic U-Net's `unet.contracting_path.<i>.layers.<j>`
  and `unet.upsampling_path.<i>.conv_block.layers.<j>`;
- `prior.` / `posterior.` + `encoder.layers.<j>` (3x3 convs between ReLUs and pools) and
  `conv_layer` (1x1 conv to mean and log-sigma);
- `fcomb.layers.<j>` (1x1 convs) and `fcomb.last_layer`.
The architecture (filters, latent size, posterior input, in_channels) is read from the
tensors; the config supplies the rest (image size, raters, normalisation). torch is needed
only to read `.pth` files; `.safetensors` and `.npz` state dicts convert without it.
A torchvision ResNet-34 state dict becomes a `.safetensors` for
`config.model.pretrained_encoder` (see `models/pretrained.py`).
"""

from absl import flags

from prosona_jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "A .pth (torch), .safetensors or .npz state dict.")
_CONFIG = cli.define_config_file("config", None,
                                          "Dataset config, e.g. configs/lidc.py.")
_OUT = flags.DEFINE_string("out", None, "Export folder (D-Persona) or .safetensors (ResNet).")
_PLATFORMS = flags.DEFINE_list("platforms", ["cpu", "cuda"],
                               "Platforms to lower the functions for.")


def main(argv):
  del argv
  from prosona_jax import converter  # pylint: disable=g-import-not-at-top
  from prosona_jax.inference import InferenceError  # pylint: disable=g-import-not-at-top

  if not _CHECKPOINT.value or not _OUT.value:
    raise InferenceError("--checkpoint and --out are required")
  summary = converter.convert(_CHECKPOINT.value, _OUT.value, _CONFIG.value, _PLATFORMS.value)
  print(f"Converted {summary['tensors']} tensors ({summary['kind']}) to {summary['out']}"
        + (f"; skipped {len(summary['unused'])} (e.g. {summary['unused'][:3]})"
           if summary.get("unused") else ""))


if __name__ == "__main__":
  cli.run(main, name="convert")
