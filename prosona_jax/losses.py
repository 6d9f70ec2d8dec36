"""Stage-1 losses: Dice, KL, the bound loss, weight regularisation and their sum.

Plain functions with keyword-only options. Where the ProSona paper and D-Persona's code
differ, the paper is the default and D-Persona's behaviour is an option (docs/method.md).
"""

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from prosona_jax.models import prob_unet

SEG_LATENTS = ("posterior", "prior")
BOUND_FORMS = ("sum", "dpersona")


def dice_loss(logits: jax.Array, targets: jax.Array, *, channel_axis: int | None = None,
              epsilon: float = 1e-6) -> jax.Array:
  """D-Persona's Dice loss, pooled over the whole batch: `1 - mean_c dice_c`.

  Probabilities are `sigmoid(logits)`. Each channel's sums run over every other axis
  (batch included). A single channel is paired with its background (`1 - p`, `1 - t`),
  as D-Persona's `GeneralizedDiceLoss` does; with several channels there is no
  background channel.

  D-Persona weights each channel's numerator and denominator by
  `1 / max(T_c^2, eps)` (T_c = target sum) and clamps the weighted denominator at eps.
  The weight cancels, so `dice_c = 2 I_c / max(D_c, eps * max(T_c^2, eps))` is the same
  value without the ~1e-11 intermediate numbers. The clamp is not harmless at scale:
  a channel with more than ~2e6 pixels (batch > ~120 at 128x128) gets its background
  Dice scaled down; pass a smaller `epsilon` for such batches.

  Args:
    logits: predicted logits; (B, H, W) for one channel, or with a channel axis.
    targets: {0, 1} (or soft) targets, same shape as `logits`.
    channel_axis: axis of the channels; None means the whole array is one channel.
    epsilon: D-Persona's clamp (1e-6).

  Returns:
    Scalar loss.
  """
  if logits.shape != targets.shape:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} differ.")
  return dice_loss_probs(jax.nn.sigmoid(logits.astype(jnp.float32)), targets,
                         channel_axis=channel_axis, epsilon=epsilon)


def dice_loss_probs(probs: jax.Array, targets: jax.Array, *, channel_axis: int | None = None,
                    epsilon: float = 1e-6) -> jax.Array:
  """`dice_loss` on probabilities instead of logits (same pooling, background, clamp).

  For models whose probabilities are not a sigmoid of one logit map, e.g. the two-class
  confusion-matrix baselines (`confusion.py`), whose noisy-label probabilities are a
  confusion matrix applied to a softmax.

  Args:
    probs: predicted probabilities, same layout as `dice_loss`'s logits.
    targets: {0, 1} (or soft) targets, same shape as `probs`.
    channel_axis: axis of the channels; None means the whole array is one channel.
    epsilon: D-Persona's clamp (1e-6).

  Returns:
    Scalar loss.
  """
  if probs.shape != targets.shape:
    raise ValueError(f"probs {probs.shape} and targets {targets.shape} differ.")
  probs = probs.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  if channel_axis is None:
    p_CN, t_CN = probs.reshape(1, -1), targets.reshape(1, -1)
  else:
    c = probs.shape[channel_axis]
    p_CN = jnp.moveaxis(probs, channel_axis, 0).reshape(c, -1)
    t_CN = jnp.moveaxis(targets, channel_axis, 0).reshape(c, -1)
  if p_CN.shape[0] == 1:
    p_CN = jnp.concatenate([p_CN, 1.0 - p_CN])
    t_CN = jnp.concatenate([t_CN, 1.0 - t_CN])
  # The intersection as a contraction: XLA's CPU backend runs it as a dot, ~3x faster
  # (forward + backward) than a multiply-then-reduce over the same pixels. HIGHEST keeps
  # GPUs from rounding its inputs to TF32.
  intersect_C = jnp.einsum("cn,cn->c", p_CN, t_CN, precision=jax.lax.Precision.HIGHEST)
  t_sum_C = jnp.sum(t_CN, axis=-1)
  denom_C = jnp.sum(p_CN, axis=-1) + t_sum_C
  denom_C = jnp.maximum(denom_C, epsilon * jnp.maximum(t_sum_C**2, epsilon))
  return 1.0 - jnp.mean(2.0 * intersect_C / denom_C)


def kl_diag_gaussians(mu_q_BD: jax.Array, log_sigma_q_BD: jax.Array, mu_p_BD: jax.Array,
                      log_sigma_p_BD: jax.Array) -> jax.Array:
  """KL(q || p) of axis-aligned Gaussians: summed over D, averaged over the batch."""
  var_ratio = jnp.exp(2.0 * (log_sigma_q_BD - log_sigma_p_BD))
  mean_term = jnp.square(mu_q_BD - mu_p_BD) * jnp.exp(-2.0 * log_sigma_p_BD)
  kl_BD = 0.5 * (var_ratio + mean_term - 1.0) - (log_sigma_q_BD - log_sigma_p_BD)
  return jnp.mean(jnp.sum(kl_BD, axis=-1))


def bound_loss(logits_KBHW: jax.Array, masks_BRHW: jax.Array, *, form: str = "sum",
               epsilon: float = 1e-6) -> jax.Array:
  """Max over K samples vs the raters' union, min vs their intersection.

  Args:
    logits_KBHW: logits of K decoded prior samples.
    masks_BRHW: the R rater masks.
    form: "sum" (the ProSona paper: Dice(max, union) + Dice(min, intersection), each
      the one-channel Dice loss with its background) or "dpersona" (D-Persona's code:
      one Dice loss over the two channels [max, min], so no background channels and
      half the scale: `1 - (dice_max + dice_min) / 2`).
    epsilon: see `dice_loss`.

  Returns:
    Scalar loss.
  """
  return bound_loss_from_extremes(jnp.max(logits_KBHW, axis=0), jnp.min(logits_KBHW, axis=0),
                                  masks_BRHW, form=form, epsilon=epsilon)


def bound_loss_from_extremes(max_BHW: jax.Array, min_BHW: jax.Array, masks_BRHW: jax.Array,
                             *, form: str = "sum", epsilon: float = 1e-6) -> jax.Array:
  """`bound_loss` given the element-wise max and min of the K logit maps."""
  masks = masks_BRHW.astype(jnp.float32)
  union_BHW, inter_BHW = jnp.max(masks, axis=1), jnp.min(masks, axis=1)
  if form == "sum":
    return (dice_loss(max_BHW, union_BHW, epsilon=epsilon)
            + dice_loss(min_BHW, inter_BHW, epsilon=epsilon))
  if form == "dpersona":
    pred_B2HW = jnp.stack([max_BHW, min_BHW], axis=1)
    target_B2HW = jnp.stack([union_BHW, inter_BHW], axis=1)
    return dice_loss(pred_B2HW, target_B2HW, channel_axis=1, epsilon=epsilon)
  raise ValueError(f"bound form must be one of {BOUND_FORMS}, got {form!r}.")


def _norm(x: jax.Array) -> jax.Array:
  # ||x||_2 with a finite gradient where x == 0.
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)))
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def l2_norm(x: jax.Array) -> jax.Array:
  """||x||_2 (unsquared), with a finite gradient at x == 0."""
  return _norm(x)


def weight_norm(params: Mapping[str, Any], *, include_biases: bool = True) -> jax.Array:
  """Sum of the (unsquared) L2 norms of prior, posterior and Fcomb parameter tensors.

  Fcomb's last layer is left out. D-Persona's `l2_regularisation` walks
  `module.parameters()`, so it includes biases (e.g. the N(0, 1) biases of the
  mu/log-sigma layers); `include_biases=False` keeps kernels only.
  """
  fcomb = {k: v for k, v in params["fcomb"].items() if k != "last"}
  total = jnp.zeros((), jnp.float32)
  for tree in (params["prior"], params["posterior"], fcomb):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      name = getattr(path[-1], "key", str(path[-1]))
      if include_biases or name != "bias":
        total = total + _norm(leaf)
  return total


def _gaussian_sample(rng: jax.Array, mu_BD: jax.Array, log_sigma_BD: jax.Array,
                     num: int | None = None) -> jax.Array:
  """One (B, D) or `num` (num, B, D) reparameterised samples of N(mu, sigma^2)."""
  shape = mu_BD.shape if num is None else (num,) + mu_BD.shape
  return prob_unet.gaussian_sample(mu_BD, log_sigma_BD,
                                   jax.random.normal(rng, shape, mu_BD.dtype))


def stage1_loss(params: Any, batch_stats: Any, model: prob_unet.ProbUNet,
                batch: Mapping[str, jax.Array], rng: jax.Array, *, posterior_input: str,
                num_bound_samples: int, bound_weight: float, kl_weight: float,
                reg_weight: float, train: bool = True, seg_latent: str = "posterior",
                bound_form: str = "sum", reg_include_biases: bool = True,
                dice_epsilon: float = 1e-6) -> tuple[jax.Array, tuple[dict, Any]]:
  """L = L_seg + kl_weight KL(q||p) + bound_weight L_bound + reg_weight ||W||.

  One rater index r is drawn per batch (as D-Persona does). The posterior sees the
  image with mask r (`one_random`) or with all R masks (`all`); either way L_seg
  compares the decoded sample with mask r: D-Persona also reconstructs one random
  mask when its posterior sees all four.

  Args:
    params: ProbUNet params.
    batch_stats: backbone BatchNorm statistics ({} for the plain U-Net).
    model: the ProbUNet.
    batch: {'image': (B, H, W, C) float32, 'masks': (B, R, H, W)}.
    rng: PRNG key of this step.
    posterior_input: "one_random" or "all" (must match the model's).
    num_bound_samples: K prior samples of the bound loss.
    bound_weight: weight of L_bound.
    kl_weight: weight of KL.
    reg_weight: weight of the weight-norm regulariser.
    train: BatchNorm in training mode (batch statistics, running averages updated).
    seg_latent: "posterior" decodes a posterior sample for L_seg (the paper and the
      Probabilistic U-Net). "prior" reproduces D-Persona's code, whose `elbo` decodes
      `prior_sampling(1, training=True)` (a reparameterised *prior* sample) despite
      its comment; its posterior then learns only through the KL term.
    bound_form: see `bound_loss`.
    reg_include_biases: see `weight_norm`.
    dice_epsilon: see `dice_loss`.

  Returns:
    (loss, (aux, new_batch_stats)); aux holds the unweighted terms, the total and the
    drawn rater index.
  """
  if seg_latent not in SEG_LATENTS:
    raise ValueError(f"seg_latent must be one of {SEG_LATENTS}, got {seg_latent!r}.")
  if posterior_input != model.posterior_input:
    raise ValueError(f"posterior_input={posterior_input!r} but the model was built with "
                     f"{model.posterior_input!r}.")
  image = batch["image"].astype(jnp.float32)
  masks_BRHW = batch["masks"].astype(jnp.float32)
  num_raters = masks_BRHW.shape[1]
  rng_rater, rng_seg, rng_bound = jax.random.split(rng, 3)
  rater = jax.random.randint(rng_rater, (), 0, num_raters)
  target_BHW = jnp.take(masks_BRHW, rater, axis=1)

  variables = {"params": params, "batch_stats": batch_stats}
  if train:
    features, updates = model.apply(variables, image, True, method="features",
                                    mutable=["batch_stats"])
    new_batch_stats = updates.get("batch_stats", batch_stats)
  else:
    features = model.apply(variables, image, False, method="features")
    new_batch_stats = batch_stats

  apply = lambda method, *args: model.apply({"params": params}, *args, method=method)
  mu_p, log_sigma_p = apply("prior_dist", image)
  cond_BHWM = model.posterior_condition(masks_BRHW, rater)
  mu_q, log_sigma_q = apply("posterior_dist", image, cond_BHWM)

  if seg_latent == "posterior":
    z_BD = _gaussian_sample(rng_seg, mu_q, log_sigma_q)
  else:
    z_BD = _gaussian_sample(rng_seg, mu_p, log_sigma_p)
  seg = dice_loss(apply("decode", features, z_BD), target_BHW, epsilon=dice_epsilon)
  kl = kl_diag_gaussians(mu_q, log_sigma_q, mu_p, log_sigma_p)

  z_KBD = _gaussian_sample(rng_bound, mu_p, log_sigma_p, num_bound_samples)
  # max/min over the K decodes, back-propagating through the winning samples only.
  max_BHW, min_BHW = prob_unet.decode_extremes(model, params, features, z_KBD)
  bound = bound_loss_from_extremes(max_BHW, min_BHW, masks_BRHW, form=bound_form,
                                   epsilon=dice_epsilon)
  reg = weight_norm(params, include_biases=reg_include_biases)

  loss = seg + kl_weight * kl + bound_weight * bound + reg_weight * reg
  aux = {"loss": loss, "seg": seg, "kl": kl, "bound": bound, "reg": reg, "rater": rater}
  return loss, (aux, new_batch_stats)
