"""What a Hugging Face CLIP folder must hold, checked without loading weights.

    clip.check_clip_folder(path)             # before any compute
    clip.check_clip_folder(path, tokenizer=False)   # image tower only (CKA)

A CLIP folder holds
  config.json                 model_type 'clip' (text_config.vocab_size, ...)
  weights                     model.safetensors, or model.safetensors.index.json
                              plus every shard it lists, or pytorch_model.bin
  tokenizer                   vocab.json + merges.txt, or tokenizer.json
                              (tokenizer_config.json, special_tokens_map.json
                              optional)
as `CLIPModel.save_pretrained` + `CLIPTokenizer.save_pretrained` (or this
project's `clip.save_pretrained` + `clip.train_tokenizer`) write it.

Why a separate check: transformers happily builds a 2-token tokenizer for a
folder without tokenizer files (every prompt becomes [0, 2, 2, ...]), and a
tokenizer larger than the text tower's vocabulary gives NaN text features;
both end in chance-level zero-shot accuracy with exit code 0. This module
reads config.json, the tokenizer's JSON files and the safetensors headers
(a few KB), so a pipeline can refuse a bad folder in milliseconds.
"""
from __future__ import annotations

import os
from typing import Any

from edgevl_jax.models import hf_io
from edgevl_jax.utils import io

SAFETENSORS = hf_io.SAFETENSORS
SAFETENSORS_INDEX = hf_io.SAFETENSORS_INDEX
TORCH_BIN = hf_io.TORCH_BIN
CONFIG = hf_io.CONFIG
# transformers' CLIPTextConfig default, used when config.json omits it.
DEFAULT_TEXT_VOCAB_SIZE = 49408

CLIP_FOLDER_CONTENTS = (
    "A CLIP folder holds config.json (model_type 'clip'), the weights "
    f"({SAFETENSORS}, or {SAFETENSORS_INDEX} with every shard it lists, or "
    f"{TORCH_BIN}) and the tokenizer (vocab.json + merges.txt, or "
    "tokenizer.json), as CLIPModel.save_pretrained plus "
    "CLIPTokenizer.save_pretrained write it (or clip.save_pretrained plus "
    "clip.train_tokenizer).")


def missing_tokenizer_files(path: str) -> list[str]:
  """Tokenizer files `path` lacks: [] when tokenizer.json or vocab.json +
  merges.txt are there, else the missing names of the closest option."""
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if has("tokenizer.json") or (has("vocab.json") and has("merges.txt")):
    return []
  if has("vocab.json") or has("merges.txt"):
    return [n for n in ("vocab.json", "merges.txt") if not has(n)]
  return ["vocab.json", "merges.txt", "tokenizer.json"]


def tokenizer_files_vocab_size(path: str) -> int:
  """1 + the largest token id in a tokenizer folder's JSON files.

  Reads tokenizer.json (model vocab + added tokens), or vocab.json plus
  added_tokens.json and tokenizer_config.json's added_tokens_decoder.
  """
  ids: list[int] = []
  fix = "re-save the tokenizer (tokenizer.save_pretrained)"
  fast = os.path.join(path, "tokenizer.json")
  if os.path.isfile(fast):
    tok = io.read_json(fast, fix=fix)
    vocab = (tok.get("model") or {}).get("vocab") or {}
    if isinstance(vocab, dict):
      ids += [int(i) for i in vocab.values()]
    ids += [int(t["id"]) for t in tok.get("added_tokens") or ()
            if isinstance(t, dict) and "id" in t]
  else:
    vocab_file = os.path.join(path, "vocab.json")
    ids += [int(i) for i in io.read_json(vocab_file, fix=fix).values()]
  added = os.path.join(path, "added_tokens.json")
  if os.path.isfile(added):
    ids += [int(i) for i in io.read_json(added, fix=fix).values()]
  tok_config = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(tok_config):
    decoder = io.read_json(tok_config, fix=fix).get(
        "added_tokens_decoder") or {}
    ids += [int(i) for i in decoder]
  return max(ids) + 1 if ids else 0


def text_vocab_size(config: dict[str, Any]) -> int:
  """text_config.vocab_size of a CLIP config.json dict (HF default if absent)."""
  text = config.get("text_config") or {}
  return int(text.get("vocab_size", DEFAULT_TEXT_VOCAB_SIZE))


def vocab_mismatch(tokenizer_size: int, vocab_size: int, *,
                   tokenizer_where: str, config_where: str) -> str | None:
  """The message for a tokenizer larger than the text tower, else None."""
  if tokenizer_size <= vocab_size:
    return None
  return (f"the tokenizer in {tokenizer_where} has {tokenizer_size} tokens "
          f"(ids up to {tokenizer_size - 1}) but {config_where} has "
          f"text_config.vocab_size={vocab_size}: ids >= {vocab_size} have no "
          "embedding row (NaN text features, chance-level zero-shot); use "
          "the tokenizer saved with these weights, or a text tower with "
          f"vocab_size >= {tokenizer_size}")


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, *,
                         where: str = "the tokenizer") -> None:
  """Raises ValueError when `tokenizer` can emit ids >= `vocab_size`.

  Args:
    tokenizer: a transformers tokenizer (from `clip.load_tokenizer`).
    vocab_size: the text tower's `text_config.vocab_size`.
    where: names the tokenizer/teacher in the message.
  """
  vocab = tokenizer.get_vocab()
  size = max(len(tokenizer), (max(vocab.values()) + 1) if vocab else 0)
  message = vocab_mismatch(size, vocab_size, tokenizer_where=where,
                           config_where="the text tower")
  if message:
    raise ValueError(message[0].upper() + message[1:] + ".")


def _weights_problems(path: str) -> tuple[str | None, list[str]]:
  """(weight file used, problems) of a CLIP folder's weights."""
  try:
    kind, files = hf_io.weight_files(path)
  except ValueError as e:
    return SAFETENSORS_INDEX, [str(e).rstrip(".")]
  if kind is None:
    return None, [f"no weights ({hf_io.WEIGHT_FILES})"]
  if kind == TORCH_BIN:
    empty = os.path.getsize(files[0]) == 0
    return kind, [f"{files[0]} is empty (0 bytes); re-copy it"] if empty else []
  return kind, [p for p in map(hf_io.safetensors_problem, files) if p]


def check_clip_folder(path: str | os.PathLike[str], *,
                      tokenizer: bool = True) -> dict[str, Any]:
  """Checks that `path` is a complete HF CLIP folder, loading no weights.

  Reads config.json, the tokenizer JSON files and the safetensors headers;
  every problem found is reported in one ValueError.

  Args:
    path: the folder.
    tokenizer: also require the tokenizer files (False for jobs that use the
      image tower only, e.g. CKA).

  Returns:
    {'path', 'weights' (file name), 'text_vocab_size', 'tokenizer_vocab_size'
    (None when tokenizer=False)}.

  Raises:
    ValueError: naming the folder, every problem and what the folder must
      hold (`CLIP_FOLDER_CONTENTS`).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise ValueError(f"CLIP folder {path!r} does not exist or is not a "
                     f"folder. {CLIP_FOLDER_CONTENTS}")
  problems: list[str] = []
  vocab_size = None
  config_file = os.path.join(path, CONFIG)
  if not os.path.isfile(config_file):
    problems.append(f"no {CONFIG}")
  else:
    try:
      config = io.read_json(config_file, fix="re-save the model")
    except ValueError as e:
      problems.append(str(e).rstrip("."))
    else:
      if config.get("model_type") != "clip":
        problems.append(f"{config_file} has model_type="
                        f"{config.get('model_type')!r}, expected 'clip'")
      else:
        vocab_size = text_vocab_size(config)
  weights, weight_problems = _weights_problems(path)
  problems += weight_problems
  tok_size = None
  if tokenizer:
    missing = missing_tokenizer_files(path)
    if missing:
      problems.append(f"no tokenizer files (missing {' / '.join(missing)})")
    else:
      try:
        tok_size = tokenizer_files_vocab_size(path)
      except (ValueError, TypeError) as e:
        problems.append(str(e).rstrip("."))
      if tok_size is not None and vocab_size is not None:
        mismatch = vocab_mismatch(tok_size, vocab_size, tokenizer_where=path,
                                  config_where=config_file)
        problems += [mismatch] if mismatch else []
  if problems:
    found = sorted(os.listdir(path))
    raise ValueError(
        f"CLIP folder {path!r} is not usable: " + "; ".join(problems)
        + f" (files there: {found[:20]}{' ...' if len(found) > 20 else ''})."
        + f" {CLIP_FOLDER_CONTENTS}")
  return {"path": path, "weights": weights, "text_vocab_size": vocab_size,
          "tokenizer_vocab_size": tok_size}
