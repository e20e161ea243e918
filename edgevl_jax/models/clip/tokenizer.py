"""CLIP tokenizer: load a local HF tokenizer, tokenize, or train a new one.

No tokenizer can be downloaded here, so demos and tests train their own
byte-level BPE in CLIP's format (lowercased, `</w>` end-of-word suffix,
`<|startoftext|>` / `<|endoftext|>`, CLIP's pre-tokenisation regex) and save
it as a folder that both `load_tokenizer` and HF `CLIPTokenizer` read.
transformers is imported lazily (it takes seconds to import).
"""
from __future__ import annotations

import collections
import json
import os
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np
from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models as bpe_models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from edgevl_jax.models.clip import folder as clip_folder
from edgevl_jax.utils import io

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's pre-tokeniser (as HF's CLIPTokenizer spells it for `tokenizers`).
_CLIP_SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d"""
               r"""|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
  """A `transformers` tokenizer from a local folder (never downloads).

  Refuses a folder without tokenizer files (transformers would otherwise
  build a 2-token tokenizer that maps every prompt to unknown tokens) and,
  when the folder also holds a CLIP config.json, a tokenizer with more
  tokens than the text tower's `vocab_size` (NaN text features).

  Args:
    path: folder with vocab.json + merges.txt or tokenizer.json (+ tokenizer
      config), e.g. an HF CLIP checkpoint folder or one written by
      `train_tokenizer`.

  Raises:
    FileNotFoundError: the folder does not exist.
    ValueError: tokenizer files missing or unreadable, or the tokenizer does
      not fit the folder's text tower; the message names the files.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f"load_tokenizer: tokenizer folder {path!r} does not exist; pass a "
        "local folder with vocab.json and merges.txt (see train_tokenizer).")
  missing = clip_folder.missing_tokenizer_files(path)
  if missing:
    raise ValueError(
        f"load_tokenizer: {path!r} has no tokenizer (missing "
        f"{' / '.join(missing)}; files there: {sorted(os.listdir(path))}); a "
        "tokenizer folder needs vocab.json + merges.txt, or tokenizer.json. "
        + clip_folder.CLIP_FOLDER_CONTENTS)
  # transformers reads config.json too; read it first for a clear error.
  config_file = os.path.join(path, clip_folder.CONFIG)
  config = (io.read_json(config_file, fix="re-save the model")
            if os.path.isfile(config_file) else {})
  # transformers takes seconds to import; only loading a tokenizer needs it.
  import transformers  # pylint: disable=g-import-not-at-top

  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        path, local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f"load_tokenizer: could not load a tokenizer from {path!r} "
        f"(files: {sorted(os.listdir(path))}): {type(e).__name__}: {e}; "
        "re-save it with tokenizer.save_pretrained.") from e
  if config.get("model_type") == "clip":
    clip_folder.check_tokenizer_fits(
        tokenizer, clip_folder.text_vocab_size(config),
        where=f"{path!r} (checked against {config_file})")
  return tokenizer


def tokenize(tokenizer: Any, texts: Sequence[str] | str, *,
             max_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, padded / truncated to `max_length`.

  Truncation keeps the start and end-of-text tokens, so pooling at the
  end-of-text token stays valid.

  Returns:
    input_ids (N, max_length) int32 and attention_mask (N, max_length) int32.
  """
  texts = [texts] if isinstance(texts, str) else list(texts)
  if max_length < 2:
    raise ValueError(f"tokenize: max_length={max_length} leaves no room for "
                     "the start and end-of-text tokens; use >= 2.")
  out = tokenizer(texts, padding="max_length", truncation=True,
                  max_length=max_length, return_tensors="np")
  return (np.asarray(out["input_ids"], np.int32),
          np.asarray(out["attention_mask"], np.int32))


def train_tokenizer(texts: Iterable[str], path: str | os.PathLike[str], *,
                    vocab_size: int = 1000, min_frequency: int = 1,
                    model_max_length: int = 77) -> str:
  """Trains a CLIP-format byte-level BPE on `texts` and saves it to `path`.

  The specials get ids 0 (`<|startoftext|>`) and 1 (`<|endoftext|>`, also
  the pad and unknown token); a text config for this tokenizer needs
  `bos_token_id=0, eos_token_id=1, pad_token_id=1` and `vocab_size >=` the
  trained size (`len(load_tokenizer(path))`).

  Args:
    texts: training corpus (class names, prompts, captions).
    path: output folder (created).
    vocab_size: target vocabulary size, specials and byte alphabet included.
    min_frequency: merges seen fewer times are not learnt.
    model_max_length: stored in the tokenizer config (CLIP: 77).

  Returns:
    `path` as a string.
  """
  texts = list(texts)
  if not texts:
    raise ValueError("train_tokenizer: texts is empty; pass the corpus "
                     "(class names, prompts) to learn merges from.")
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 2:
    raise ValueError(
        f"train_tokenizer: vocab_size={vocab_size} is smaller than the byte "
        f"alphabet plus specials ({len(alphabet) + 2}); raise it.")
  tok = Tokenizer(_bpe())
  tok.normalizer = normalizers.Sequence([
      normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
      normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed",
                           invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  words = collections.Counter(
      piece for text in texts for piece, _ in tok.pre_tokenizer.pre_tokenize_str(
          tok.normalizer.normalize_str(text)))
  vocab, merges = _learn_bpe(words, alphabet, vocab_size=vocab_size,
                             min_frequency=min_frequency)
  tok.model = _bpe(vocab=vocab, merges=merges)
  _add_word_final_bytes(tok, alphabet)
  tok.post_processor = processors.RobertaProcessing(
      (EOS, tok.token_to_id(EOS)), (BOS, tok.token_to_id(BOS)),
      trim_offsets=False, add_prefix_space=False)

  path = os.fspath(path)
  # vocab.json, merges.txt (what CLIPTokenizer reads) in the format of
  # `tokenizers`, which writes them itself: copied over atomically.
  with tempfile.TemporaryDirectory() as tmp:
    for file in tok.model.save(tmp):
      with open(file, "rb") as f:
        io.atomic_write_bytes(os.path.join(path, os.path.basename(file)),
                              f.read())
  io.atomic_write_text(os.path.join(path, "tokenizer.json"),
                       tok.to_str(pretty=True))
  io.atomic_write_json(os.path.join(path, "tokenizer_config.json"), {
      "tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS,
      "unk_token": EOS, "pad_token": EOS, "do_lower_case": True,
      "model_max_length": model_max_length,
      "model_input_names": ["input_ids", "attention_mask"],
  })
  io.atomic_write_json(os.path.join(path, "special_tokens_map.json"), {
      "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
  return path


def _bpe(**kwargs: Any) -> bpe_models.BPE:
  """A BPE model in CLIP's format: `</w>` marks a word's end."""
  return bpe_models.BPE(unk_token=EOS, end_of_word_suffix="</w>",
                        continuing_subword_prefix="", fuse_unk=False, **kwargs)


def _learn_bpe(words: collections.Counter, alphabet: Sequence[str], *,
               vocab_size: int, min_frequency: int
               ) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """Byte-level BPE merges from word counts, deterministically.

  The classic algorithm (Sennrich et al. 2016): repeatedly merge the most
  frequent adjacent symbol pair, a word's last symbol carrying '</w>'.
  Count ties go to the lexicographically smallest pair, so the same corpus
  always gives the same vocabulary (HF's trainer breaks ties in hash order,
  which differs between processes and runs).

  Args:
    words: byte-level pre-tokenised word -> count.
    alphabet: the byte alphabet (every byte gets a token).
    vocab_size: stop when the vocabulary (specials included) has this size.
    min_frequency: pairs seen fewer times are not merged.

  Returns:
    (vocab token -> id with specials 0 and 1, merges in learning order).
  """
  symbols = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words if w}
  tokens = [BOS, EOS] + sorted(alphabet)
  tokens += sorted({s[-1] for s in symbols.values()} - set(tokens))
  vocab = {t: i for i, t in enumerate(tokens)}
  merges = []
  while len(vocab) < vocab_size:
    pairs = collections.Counter()
    for w, syms in symbols.items():
      for pair in zip(syms, syms[1:]):
        pairs[pair] += words[w]
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    if pairs[best] < min_frequency:
      break
    merged = best[0] + best[1]
    merges.append(best)
    if merged not in vocab:
      vocab[merged] = len(vocab)
    for w, syms in symbols.items():
      out, i = [], 0
      while i < len(syms):
        if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
          out.append(merged)
          i += 2
        else:
          out.append(syms[i])
          i += 1
      symbols[w] = tuple(out)
  return vocab, merges


def _add_word_final_bytes(tok: Any, alphabet: Sequence[str]) -> None:
  """Gives every byte a word-final `x</w>` token, as CLIP's vocab has.

  The trainer only creates `x</w>` for bytes that ended a training word, so
  an unseen word ending would otherwise become the unknown token.
  """
  vocab = tok.get_vocab()
  missing = [c + "</w>" for c in sorted(alphabet) if c + "</w>" not in vocab]
  if missing:
    model = tok.model
    vocab = dict(vocab)
    for token in missing:
      vocab[token] = len(vocab)
    tok.model = _bpe(vocab=vocab, merges=_read_merges(model))


def _read_merges(model: Any) -> list[tuple[str, str]]:
  """The learnt merges of a `tokenizers` BPE model, in rank order."""
  state = json.loads(model.__getstate__())
  return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
          for m in state["merges"]]
