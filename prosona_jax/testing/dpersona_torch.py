"""D-Persona's network and its steps in PyTorch, for the converter tests and benchmarks.

Written after D-Persona's `lib/DPersona.py`: smp 0.3.3's `Unet` with a ResNet-34 encoder
(or, `backbone="unet"`, the Probabilistic U-Net's own U-Net) without its head, the prior
and posterior conv Gaussians, Fcomb and the per-rater projection heads, with D-Persona's
tensor names, so that `prosona_jax.converter` reads its state dicts.

torch is imported when a function here is called, never at import: the package does not
depend on it (`pip install torch` to use this module).

The step functions do the work of D-Persona's `train_step` (stage 1 and 2), `val_step`
and `test_step`, spelled more cheaply in three places, each of which can only make
PyTorch faster: z is broadcast over H x W with `expand` (D-Persona: `repeat` and
`index_select`), a bank of N prior samples is one `randn` (D-Persona: N `sample()`
calls), and the KL term is the closed form without `torch.distributions` objects.
"""

from __future__ import annotations

from typing import Any, Sequence

RESNET34_LAYERS = (3, 4, 6, 3)
RESNET34_WIDTHS = (64, 128, 256, 512)
DECODER_CHANNELS = (256, 128, 64, 32, 16)
HEAD_FILTERS = (32, 16)  # D-Persona's `Conv_block(16, [32, 16, latent_dim], 3)`.


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:  # Only tests and benchmarks get here; they skip without torch.
    raise ImportError("prosona_jax.testing.dpersona_torch needs PyTorch "
                      "(pip install torch).") from e
  return torch


def build(backbone: str = "resnet34", *, in_channels: int = 1, num_raters: int = 4,
          latent_dim: int = 6, gaussian_filters: Sequence[int] = (16, 32, 64, 128, 256),
          unet_filters: Sequence[int] = (32, 64, 128, 192), fcomb_layers: int = 3,
          seed: int = 0) -> Any:
  """D-Persona's `DPersona` module (train mode, float32, on the CPU).

  Args:
    backbone: "resnet34" (smp Unet-ResNet34, D-Persona's default) or "unet" (the
      Probabilistic U-Net's U-Net, `original_backbone=True`).
    in_channels: image channels.
    num_raters: R: the posterior's extra input channels and the number of heads.
    latent_dim: D.
    gaussian_filters: filters of the prior and posterior encoders.
    unet_filters: filters of the plain U-Net (the ResNet U-Net's are fixed).
    fcomb_layers: hidden 1x1 convs of Fcomb (D-Persona's `no_convs_fcomb` - 1).
    seed: `torch.manual_seed` before the parameters are drawn.

  Returns:
    A `torch.nn.Module` with `unet`, `prior`, `posterior`, `fcomb` and `proj_heads`;
    `unet(x)` gives the features (B, F, H, W), `prior(x)` and `posterior(x_and_masks)`
    give (mu, log_sigma), `fcomb(features, z)` the logits (B, 1, H, W) and
    `proj_heads(features, bank, r)` head r's latent (B, D).
  """
  torch = _torch()
  nn, F = torch.nn, torch.nn.functional
  feature_channels = DECODER_CHANNELS[-1] if backbone == "resnet34" else unet_filters[0]

  class Block(nn.Module):  # torchvision's BasicBlock.
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout)
      self.downsample = None
      if stride != 1 or cin != cout:
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                        nn.BatchNorm2d(cout))

    def forward(self, x):
      y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
      return F.relu(y + (x if self.downsample is None else self.downsample(x)))

  class Encoder(nn.Module):  # smp's ResNetEncoder: returns [x, stem, layer1..4].
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      cin = 64
      for i, (n, w) in enumerate(zip(RESNET34_LAYERS, RESNET34_WIDTHS)):
        blocks = [Block(cin if j == 0 else w, w, 2 if (i and not j) else 1) for j in range(n)]
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        cin = w

    def forward(self, x):
      feats = [x, F.relu(self.bn1(self.conv1(x)))]
      x = F.max_pool2d(feats[-1], 3, 2, 1)
      for i in range(1, 5):
        x = getattr(self, f"layer{i}")(x)
        feats.append(x)
      return feats

  def conv_relu(cin, cout):  # smp's Conv2dReLU: Sequential(conv, BatchNorm, ReLU).
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())

  class DecBlock(nn.Module):
    def __init__(self, cin, cskip, cout):
      super().__init__()
      self.conv1, self.conv2 = conv_relu(cin + cskip, cout), conv_relu(cout, cout)

    def forward(self, x, skip):
      x = F.interpolate(x, scale_factor=2, mode="nearest")
      if skip is not None:
        x = torch.cat([x, skip], 1)
      return self.conv2(self.conv1(x))

  class Decoder(nn.Module):
    def __init__(self):
      super().__init__()
      ins, skips = (512,) + DECODER_CHANNELS[:-1], (256, 128, 64, 64, 0)
      self.blocks = nn.ModuleList(DecBlock(i, s, o) for i, s, o in
                                  zip(ins, skips, DECODER_CHANNELS))

    def forward(self, *features):
      features = features[1:][::-1]
      x, skips = features[0], features[1:]
      for i, block in enumerate(self.blocks):
        x = block(x, skips[i] if i < len(skips) else None)
      return x

  class UnetHeadless(nn.Module):
    def __init__(self):
      super().__init__()
      self.seg_encoder, self.seg_decoder = Encoder(), Decoder()

    def forward(self, x):
      return self.seg_decoder(*self.seg_encoder(x))

  def convs(cin, cout, n=3, pool=False):
    layers = [nn.AvgPool2d(2, 2, 0, ceil_mode=True)] if pool else []
    for k in range(n):
      layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)

  class Down(nn.Module):  # The Probabilistic U-Net's DownConvBlock.
    def __init__(self, cin, cout, pool):
      super().__init__()
      self.layers = convs(cin, cout, pool=pool)

    def forward(self, x):
      return self.layers(x)

  class Up(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.conv_block = Down(cin, cout, False)

    def forward(self, x, bridge):
      x = F.interpolate(x, mode="bilinear", scale_factor=2, align_corners=True)
      return self.conv_block(torch.cat([x, bridge], 1))

  class PlainUnet(nn.Module):
    def __init__(self, filters):
      super().__init__()
      self.contracting_path = nn.ModuleList(
          Down(in_channels if i == 0 else filters[i - 1], f, i > 0)
          for i, f in enumerate(filters))
      self.upsampling_path = nn.ModuleList(
          Up(filters[i + 1] + filters[i], filters[i]) for i in range(len(filters) - 2, -1, -1))

    def forward(self, x):
      blocks = []
      for i, down in enumerate(self.contracting_path):
        x = down(x)
        if i != len(self.contracting_path) - 1:
          blocks.append(x)
      for i, up in enumerate(self.upsampling_path):
        x = up(x, blocks[-i - 1])
      return x

  class GaussEncoder(nn.Module):
    def __init__(self, cin):
      super().__init__()
      layers = []
      for i, f in enumerate(gaussian_filters):
        layers += list(convs(cin if i == 0 else gaussian_filters[i - 1], f, pool=i > 0))
      self.layers = nn.Sequential(*layers)

  class Gaussian(nn.Module):  # AxisAlignedConvGaussian: (mu, log_sigma).
    def __init__(self, cin):
      super().__init__()
      self.encoder = GaussEncoder(cin)
      self.conv_layer = nn.Conv2d(gaussian_filters[-1], 2 * latent_dim, 1)

    def forward(self, x):
      h = self.encoder.layers(x).mean((2, 3), keepdim=True)
      out = self.conv_layer(h)[:, :, 0, 0]
      return out[:, :latent_dim], out[:, latent_dim:]

  class Fcomb(nn.Module):
    def __init__(self):
      super().__init__()
      layers = []
      for k in range(fcomb_layers):
        cin = feature_channels + latent_dim if k == 0 else feature_channels
        layers += [nn.Conv2d(cin, feature_channels, 1), nn.ReLU()]
      self.layers = nn.Sequential(*layers)
      self.last_layer = nn.Conv2d(feature_channels, 1, 1)

    def forward(self, feats, z):
      z = z[:, :, None, None].expand(-1, -1, *feats.shape[2:])
      return self.last_layer(self.layers(torch.cat([feats, z], 1)))

  class Head(nn.Module):  # D-Persona's Conv_block(16, [32, 16, D], padding=3).
    def __init__(self):
      super().__init__()
      layers, cin = [], feature_channels
      for i, f in enumerate(tuple(HEAD_FILTERS) + (latent_dim,)):
        if i:
          layers.append(nn.AvgPool2d(2, 2))
        layers += [nn.Conv2d(cin, f, 3, padding=3), nn.ReLU(), nn.Dropout2d(0.1),
                   nn.Conv2d(f, f, 3, padding=3), nn.ReLU()]
        cin = f
      self.layers = nn.Sequential(*layers)

  class Projection(nn.Module):
    def __init__(self):
      super().__init__()
      self.multi_expert_heads = nn.ModuleList(Head() for _ in range(num_raters))

    def forward(self, feats, bank_BND, r):
      q_BD = self.multi_expert_heads[r].layers(feats).mean((2, 3))
      w_B1N = torch.softmax(torch.bmm(q_BD[:, None], bank_BND.transpose(1, 2)), dim=2)
      return torch.bmm(w_B1N, bank_BND)[:, 0]

  class DPersona(nn.Module):
    def __init__(self):
      super().__init__()
      self.unet = UnetHeadless() if backbone == "resnet34" else PlainUnet(tuple(unet_filters))
      self.prior, self.posterior = Gaussian(in_channels), Gaussian(in_channels + num_raters)
      self.fcomb = Fcomb()
      self.proj_heads = Projection()

  torch.manual_seed(seed)
  net = DPersona()
  _initialise(torch, net)
  return net


def _initialise(torch, net) -> None:
  """D-Persona's initialisers: torchvision's and smp's in the ResNet U-Net, Kaiming-normal
  (fan-in) weights with tiny truncated-normal biases elsewhere, orthogonal Fcomb."""
  init = torch.nn.init

  def tiny(bias):
    init.trunc_normal_(bias, std=1e-3, a=-2e-3, b=2e-3)

  for name, mod in net.named_modules():
    if not isinstance(mod, torch.nn.Conv2d):
      continue
    if name.startswith("unet.seg_encoder."):
      init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
    elif name.startswith("unet.seg_decoder."):
      init.kaiming_uniform_(mod.weight, mode="fan_in", nonlinearity="relu")
    elif name.startswith("fcomb."):
      init.orthogonal_(mod.weight)
      tiny(mod.bias)
    elif name.endswith("conv_layer"):
      init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
      init.normal_(mod.bias)
    else:  # Plain U-Net, prior and posterior encoders, heads.
      init.kaiming_normal_(mod.weight, mode="fan_in", nonlinearity="relu")
      tiny(mod.bias)


def state_dict_numpy(net) -> dict:
  """The state dict as float32 numpy arrays (what `converter.convert_state_dict` reads)."""
  return {k: v.detach().cpu().float().numpy() for k, v in net.state_dict().items()}


def generalized_dice_loss(logits, targets, epsilon: float = 1e-6):
  """D-Persona's `GeneralizedDiceLoss(normalization="sigmoid")` on (B, C, H, W)."""
  torch = _torch()
  c = logits.shape[1]
  p = torch.sigmoid(logits).transpose(0, 1).reshape(c, -1)
  t = targets.float().transpose(0, 1).reshape(c, -1)
  if c == 1:  # A lone channel is paired with its background.
    p, t = torch.cat([p, 1 - p]), torch.cat([t, 1 - t])
  w = 1.0 / (t.sum(-1) ** 2).clamp(min=epsilon)
  dice = 2 * (p * t).sum(-1) * w / ((p + t).sum(-1) * w).clamp(min=epsilon)
  return 1.0 - dice.mean()


def _l2(module):
  return sum(p.norm(2) for p in module.parameters())


def _gaussian(mu, log_sigma, num: int | None = None):
  torch = _torch()
  shape = mu.shape if num is None else (num,) + tuple(mu.shape)
  return mu + log_sigma.exp() * torch.randn(shape, dtype=mu.dtype, device=mu.device)


def stage1_loss(net, images, masks, *, rater: int, num_bound_samples: int = 10,
                bound_weight: float = 0.5, reg_weight: float = 1e-5):
  """D-Persona's Stage-1 loss (`train_step(stage=1)`): posterior on the image and all masks.

  L = Dice(posterior sample's decode, mask `rater`) + KL + bound_weight * Dice([max, min]
  of K prior decodes, [union, intersection]) + reg_weight * weight norms.
  images (B, C, H, W), masks (B, R, H, W).
  """
  torch = _torch()
  feats = net.unet(images)
  mu_p, ls_p = net.prior(images)
  mu_q, ls_q = net.posterior(torch.cat([images, masks], 1))
  kl = (0.5 * ((2 * (ls_q - ls_p)).exp() + (mu_q - mu_p) ** 2 * (-2 * ls_p).exp() - 1)
        - (ls_q - ls_p)).sum(1).mean()
  recon = generalized_dice_loss(net.fcomb(feats, _gaussian(mu_q, ls_q)),
                                masks[:, rater:rater + 1])
  z_KBD = _gaussian(mu_p, ls_p, num_bound_samples)
  logits_BKHW = torch.cat([net.fcomb(feats, z) for z in z_KBD], 1)
  pred = torch.cat([logits_BKHW.max(1, keepdim=True).values,
                    logits_BKHW.min(1, keepdim=True).values], 1)
  target = torch.cat([masks.max(1, keepdim=True).values, masks.min(1, keepdim=True).values], 1)
  bound = generalized_dice_loss(pred, target)
  reg = reg_weight * (_l2(net.posterior) + _l2(net.prior) + _l2(net.fcomb.layers))
  return recon + kl + bound_weight * bound + reg


def rater_logits(net, images, *, bank_size: int):
  """D-Persona's `test_step`: every head's logits (B, R, H, W) from a prior bank of N."""
  torch = _torch()
  feats = net.unet(images)
  mu, log_sigma = net.prior(images)
  with torch.no_grad():  # `dist.sample()`: the bank carries no gradient.
    eps = torch.randn((mu.shape[0], bank_size, mu.shape[1]), dtype=mu.dtype, device=mu.device)
    bank_BND = mu[:, None] + log_sigma.exp()[:, None] * eps
  heads = net.proj_heads.multi_expert_heads
  return torch.cat([net.fcomb(feats, net.proj_heads(feats, bank_BND, r))
                    for r in range(len(heads))], 1)


def sample_logits(net, images, num_samples: int):
  """D-Persona's `val_step`: logits (B, N, H, W) of N prior samples."""
  torch = _torch()
  feats = net.unet(images)
  mu, log_sigma = net.prior(images)
  return torch.cat([net.fcomb(feats, _gaussian(mu, log_sigma)) for _ in range(num_samples)], 1)
