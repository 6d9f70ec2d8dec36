"""The default configuration every `configs/*.py` starts from.

Each field has a one-line comment. Dataset configs override what differs; the command
line overrides the rest (`--config.stage1.lr=3e-4`). `lock_config=True` in `main.py`
makes a misspelt override fail at start-up, so every field a run may set lives here.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the ProSona defaults (the paper's choices; D-Persona's behind switches)."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # Base PRNG seed for initialisation and sampling.
  c.method = "prosona"  # prosona | unet | cm_global | cm_pixel | pionono | dpersona | tab.
  c.stages = ()  # Which of the method's stages `main` runs, in order (empty: all).
  c.rater = 0  # unet: rater rank 0..R-1 its U-Net trains on; -1: one U-Net per rater, in turn.
  c.allow_config_change = False  # Resume though fields outside config_lib.RESUMABLE_FIELDS changed.

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.format = "synthetic"  # synthetic | lidc_attributes | lidc_crops | npz | folder | auto.
  d.path = ""  # File or folder of the dataset (unused for `synthetic`).
  d.image_size = 128  # Images and masks are H = W = image_size.
  d.in_channels = 1  # Image channels C.
  d.num_raters = 4  # R: masks per image.
  d.rater_names = ("rater1", "rater2", "rater3", "rater4")  # Display / folder names of raters.
  d.order_raters_by_area = False  # Re-order masks per image by ascending area (LIDC: True).
  d.num_folds = 4  # K of the K-fold cross-validation.
  d.split_seed = 1337  # Seed of the fold assignment.
  d.split_level = "patient"  # patient (grouped folds) | slice (D-Persona's historical folds).
  d.fold = 0  # Test fold of this run; -1 runs every fold in turn.
  d.val_fraction = 0.1  # Fraction of training patients carved out for validation.
  d.batch_size = 8  # Global batch size (paper: 8; D-Persona: 12).
  d.eval_batch_size = 16  # Batch size for validation and test scoring.
  d.shuffle_seed = 0  # Seed of the training-order shuffle and augmentation.
  d.shuffle_seed_per_fold = 1000  # Fold k's shuffle seed: shuffle_seed + k * this + stage offset.
  d.worker_count = 0  # Grain worker processes (0: in the main process).
  d.augment_flip = True  # Random horizontal and vertical flips.
  d.augment_rotate = True  # Random rotation by an angle in [-180, 180] degrees.
  # Synthetic multi-rater set (format == "synthetic").
  d.synthetic = ml_collections.ConfigDict()
  d.synthetic.num_images = 256  # Images in the set.
  d.synthetic.num_patients = 64  # Images are grouped into this many patients.
  d.synthetic.seed = 0  # Generation seed: same seed, same set.
  # Multi-rater folder layout (format == "folder").
  d.folder = ml_collections.ConfigDict()
  d.folder.image_name = "image"  # Stem of the image file in each case folder.
  d.folder.axis = 2  # Slicing axis of 3-D volumes.
  d.folder.skip_empty_slices = False  # Keep only slices where some rater drew something.
  d.folder.resize = "crop_or_pad"  # crop_or_pad (no interpolation) | resample (fit, then pad).
  d.folder.normalize = "robust"  # robust (0.5-99.5 percentiles to [0, 1]) | minmax | none.

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.backbone = "resnet34"  # resnet34 (D-Persona's U-Net) | unet (Probabilistic U-Net's).
  m.feature_channels = 16  # Channels of the full-resolution feature map.
  m.unet_filters = (32, 64, 128, 192)  # Filters of the plain U-Net backbone.
  m.unet_batch_norm = False  # BatchNorm after each plain U-Net conv (not in the original).
  m.latent_dim = 6  # D: dimension of the latent space.
  m.gaussian_filters = (16, 32, 64, 128, 256)  # Prior/posterior encoder filters.
  m.convs_per_block = 3  # 3x3 convs per prior/posterior level.
  m.posterior_input = "one_random"  # one_random (ProSona) | all (D-Persona).
  m.fcomb_layers = 3  # Hidden 1x1 conv layers of Fcomb.
  m.pretrained_encoder = ""  # Local torchvision ResNet-34 weights (.safetensors/.pth); "" = scratch.

  # ---------------------------------------------------------------- stage 1
  s1 = c.stage1 = ml_collections.ConfigDict()
  s1.epochs = 100  # Training epochs.
  s1.lr = 1e-4  # Peak learning rate of Adam.
  s1.schedule = "constant"  # constant (paper) | cosine (D-Persona, per epoch).
  s1.num_bound_samples = 10  # K prior samples of the bound loss.
  s1.bound_weight = 0.5  # Weight of L_bound (D-Persona: 0.5).
  s1.kl_weight = 1.0  # Weight of L_KL.
  s1.reg_weight = 1e-5  # Weight-norm regularisation of prior, posterior, Fcomb.
  s1.seg_latent = "posterior"  # Latent decoded for L_seg: posterior (paper) | prior (D-Persona's code).
  s1.bound_form = "sum"  # sum: Dice(max, union) + Dice(min, inter) (paper) | dpersona.
  s1.reg_include_biases = True  # D-Persona's regulariser iterates all parameters, biases too.
  s1.dice_epsilon = 1e-6  # Epsilon of the generalised Dice loss (lower it for huge batches).
  s1.checkpoint_every = 500  # Save a checkpoint every N steps (and at the end).
  s1.log_every = 50  # Log losses every N steps.
  s1.eval_every_epochs = 10  # Validation every N epochs (0: only at the end).
  s1.max_steps = -1  # Stop after this many steps (-1: epochs decide).
  s1.seed_offset = 0  # PRNG of this stage: fold_in(key(seed + seed_offset), fold).
  s1.shuffle_seed_offset = 0  # Added to the data shuffle seed of this stage.

  # ---------------------------------------------------------------- stage 2
  s2 = c.stage2 = ml_collections.ConfigDict()
  s2.epochs = 100  # Training epochs.
  s2.lr = 1e-4  # Learning rate of Adam.
  s2.schedule = "constant"  # constant | cosine.
  s2.num_samples = 10  # K prior samples forming the prompt latent (D-Persona: 100 train).
  s2.eval_num_samples = 10  # K at test time (D-Persona: 500).
  s2.seg_phrasings_per_rater = 1  # Phrasings per rater decoded for L_seg each step (0: all).
  s2.scale_scores = True  # Divide scores by sqrt(D) (ProSona); False is D-Persona's.
  s2.alpha = 1.0  # Weight of L_text.
  s2.beta = 1.0  # Weight of L_sim.
  s2.tau = 0.07  # Temperature of the contrastive losses.
  s2.dice_epsilon = 1e-6  # Epsilon of the Dice loss of L_seg (see stage1.dice_epsilon).
  s2.projector_hidden = 256  # Hidden width of the two-layer projector MLP.
  s2.checkpoint_every = 500  # Save every N steps (and at the end).
  s2.log_every = 50  # Log every N steps.
  s2.eval_every_epochs = 10  # Validation every N epochs (0: only at the end).
  s2.max_steps = -1  # Stop after this many steps (-1: epochs decide).
  # Stage-1 checkpoints Stage 2 starts from (`{fold}` is replaced by the fold), or a run's
  # work directory (e.g. runs/demo: its fold<k>/stage1/checkpoints); "": this run's
  # WORKDIR/fold<k>/stage1/checkpoints. Only the parameters are read.
  s2.init_from = ""
  s2.seed_offset = 2  # PRNG of this stage: fold_in(key(seed + seed_offset), fold).
  s2.shuffle_seed_offset = 1  # Added to the data shuffle seed of this stage.
  s2.grid_alpha = (0.0, 0.5, 1.0)  # Ablation grid values of alpha (paper Fig. 5).
  s2.grid_beta = (0.0, 0.5, 1.0)  # Ablation grid values of beta.
  s2.grid_cells_per_pass = 0  # Grid cells vmapped together per pass (0: auto, see grid.py).

  # ---------------------------------------------------------------- text encoder
  t = c.text = ml_collections.ConfigDict()
  t.kind = "clip"  # clip (FlaxCLIPTextModel) | bert (FlaxBertModel, mean pooled) | tiny_clip | tiny_bert.
  t.model = "openai/clip-vit-base-patch32"  # Hub id or local folder of the weights.
  t.max_length = 32  # Token length prompts are padded/truncated to.
  # Prompt bank: one tuple of phrasings per rater, in rater order.
  t.prompts = ml_collections.ConfigDict()
  t.prompts.train = ()  # tuple of tuples: train phrasings per rater.
  t.prompts.heldout = ()  # tuple of tuples: held-out phrasings per rater (evaluation only).

  # ---------------------------------------------------------------- evaluation
  e = c.eval = ml_collections.ConfigDict()
  e.num_samples = 10  # Prior samples per test image in Stage-1 scoring.
  e.convention = "dpersona"  # dpersona | standard (see docs/metrics.md).
  e.num_images_logged = 4  # Images written to TensorBoard and figures.
  # Tested state: val (best on the validation split) | test (best on the test fold, as
  # the published baselines) | last | auto (prosona's stages: last; the baselines: val).
  e.select_on = "auto"

  _baselines(c)
  return c


def _protocol(section: ml_collections.ConfigDict, *, lr: float, epochs: int = 100,
              schedule: str = "cosine", eval_every_epochs: int = 1, seed_offset: int = 0,
              shuffle_seed_offset: int = 0) -> None:
  """The fields every baseline section shares with stage1/stage2 (D-Persona's protocol:
  Adam, cosine per epoch, 100 epochs, validation and selection every epoch)."""
  section.epochs = epochs  # Training epochs.
  section.lr = lr  # Adam learning rate (of the backbone group where there are several).
  section.schedule = schedule  # constant | cosine (per epoch, every group; D-Persona's).
  section.checkpoint_every = 500  # Save every N steps (and at the end).
  section.log_every = 50  # Log every N steps.
  section.eval_every_epochs = eval_every_epochs  # Validation + selection every N epochs (0: end).
  section.max_steps = -1  # Stop after this many steps (-1: epochs decide).
  section.seed_offset = seed_offset  # PRNG: fold_in(key(seed + seed_offset), fold).
  section.shuffle_seed_offset = shuffle_seed_offset  # Added to the data shuffle seed.


def _baselines(c: ml_collections.ConfigDict) -> None:
  """The Table-1 baselines' sections (BASELINES.md). Their values are the `DEFAULTS` of
  the `models/` modules (tests/test_methods.py holds them equal); the backbone is
  `config.model`'s."""
  u = c.unet = ml_collections.ConfigDict()
  _protocol(u, lr=1e-4)
  u.score_against = "all"  # all: its one prediction vs every rater (presumed) | own: vs its rater.
  u.dice_epsilon = 1e-6  # Clamp of the generalised Dice loss.

  for level in ("global", "pixel"):
    cm = c[f"cm_{level}"] = ml_collections.ConfigDict()
    _protocol(cm, lr=1e-4)
    cm.num_classes = 1  # 1: as D-Persona runs it (a no-op) | 2: the softmax variant (*_2class).
    cm.alpha = 1.0  # Weight of the trace term.
    cm.min_trace = False  # False: trace subtracted (as run) | True: added (Tanno et al.).
    cm.rater_draw = "image"  # image: a random rater per image (as run) | batch: one per batch.
    cm.cm_lr = 1e-2  # Adam learning rate of the confusion-matrix parameters.
    cm.dice_epsilon = 1e-6  # Clamp of the generalised Dice loss.

  p = c.pionono = ml_collections.ConfigDict()
  _protocol(p, lr=1e-4)
  p.latent_dim = 8  # Dimension of each rater's latent Gaussian.
  p.prior_sigma = 2.0  # Fixed prior N(0, prior_sigma^2 I); also L's initial diagonal.
  p.posterior_init_sigma = 8.0  # The rater means start at N(0, posterior_init_sigma^2).
  p.train_samples = 5  # Samples per image in the loss (logits averaged).
  p.test_samples = 20  # Samples per rater at prediction time (logits averaged).
  p.kl_weight = 5e-4  # Weight of mean_b KL(q_r(b) || p).
  p.reg_weight = 1e-5  # Weight of the head's weight-norm regulariser.
  p.rater_draw = "image"  # image: a random rater per image (as run) | batch: one per batch.
  p.latent_lr = 0.02  # Adam learning rate of the latent parameters (mu, L).
  p.dice_epsilon = 1e-6  # Clamp of the generalised Dice loss.

  # D-Persona's Stage 2 (method `dpersona` = stage1, then this); same seeds as stage2.
  dp = c.dpersona = ml_collections.ConfigDict()
  _protocol(dp, lr=1e-4, seed_offset=2, shuffle_seed_offset=1)
  dp.filters = (32, 16)  # Widths of the heads' first levels; the last is model.latent_dim.
  dp.padding = 3  # Padding of every head conv (the reference's, not SAME).
  dp.dropout = 0.1  # Dropout2d rate, in training only.
  dp.train_samples = 100  # Prior bank per forward in training and validation.
  dp.test_samples = 500  # Prior bank at test.
  dp.bn_drift = False  # Stage-1 BatchNorm in training mode, stats updated (the reference's).
  dp.dice_epsilon = 1e-6  # Clamp of the generalised Dice loss.
  # Stage-1 checkpoints the heads sit on (`{fold}` is replaced); "": this run's Stage 1.
  dp.init_from = ""

  t = c.tab = ml_collections.ConfigDict()
  # TAB's own optimiser by default (LIDC protocol: --config.tab.lr=1e-4 and schedule=cosine).
  _protocol(t, lr=5e-5, schedule="poly")
  t.power = 0.9  # Exponent of the poly schedule lr (1 - epoch / epochs)^power.
  t.weight_decay = 0.0  # PyTorch-Adam L2 (added to the gradient); TAB's run.sh sets 0.
  t.lam = 1.0  # Weight of the rater-query BCE (TAB's README 1.0; its argparse 1.25).
  t.rank = 7  # Rank of the low-rank covariance factor.
  t.hidden_dim = 256  # d of the transformer.
  t.num_heads = 8  # Attention heads (transformer and attention map).
  t.dim_feedforward = 512  # Width of the transformer's FFN.
  t.dropout = 0.1  # Transformer dropout.
  t.enc_layers = 1  # Transformer encoder layers.
  t.dec_layers = 1  # Transformer decoder layers.
  t.mask_dim = 32  # Channels of the mask head's full-resolution output.
  t.num_queries = 0  # Q = 1 consensus + R rater queries; 0 means 1 + R.
  t.repeat_grey = True  # Repeat a 1-channel image to 3 channels (the RGB stem).
  t.freeze_stem_layer1 = True  # Stem conv and layer1 frozen (outside the optimizer).
