"""grain loaders for the EdgeVL trainers (no TensorFlow at training time).

All loaders take a source from `edgevl_jax.data.load_split` and return a
`grain.DataLoader` whose batches are dicts of numpy arrays:

  paired_loader   {'rgb', 'other': float32 (B, S, S, 3) in [0, 1],
                   'label', 'index': int32 (B,)} (+ 'pseudo_label' int32
                   (B,) for a pseudo-labelled subset)
  caption_loader  {'rgb', 'label', 'index', 'caption': str (B,),
                   'text_draw': float32 (B, 2) uniforms for the text choice}
  embed_loader    same, plus 'valid' bool (B,): every example exactly once
  triplet_loader  {'rgb', 'other': (B, 2 + K, S, S, 3), 'label', 'index':
                   int32 (B, 2 + K), 'mask': bool (B, 2 + K)}

'index' is always the example's position in the full split source; the
`indices` of a subset and the rows of a triplet array use the same numbers.

Sharding: each JAX process reads its own shard (defaults: this process of
`jax.process_count()`); the trainer assembles the global batch on its mesh.
Training streams are one global shuffle of which process p reads positions
p, p + P, p + 2P, ...: the union of the per-process batches of a step holds
the same examples with the same augmentation draws as batch k of a
1-process run, whatever the process count (so runs on 1 and on N hosts
train on the same data). The exactly-once embed pass gives each process a
contiguous block instead.
Determinism and resumption: shuffling and augmentation randomness come from
`seed` and the record position only, so `iter(loader)` with the same
arguments replays the same batches, and `iterator.get_state()` /
`set_state()` (which the trainer's checkpointer saves per process beside
the train state) resume mid-epoch exactly.
"""
import hashlib
from typing import Any, Sequence

from absl import flags
import grain

import jax
import numpy as np

from edgevl_jax.data import transforms

Record = dict[str, Any]


class SubsetSource:
  """The records of `source` at `indices`, optionally with pseudo-labels.

  Record i is source[indices[i]] (so its 'index' stays the position in the
  full split) plus 'pseudo_label' = pseudo_labels[i] when given.
  """

  def __init__(self, source, indices: Sequence[int],
               pseudo_labels: Sequence[int] | None = None):
    self.source = source
    self.indices = np.asarray(indices, np.int64).reshape(-1)
    n = len(source)
    if self.indices.size == 0:
      raise ValueError("indices is empty; a subset needs at least one "
                       "example (did curation keep a zero fraction?).")
    bad = (self.indices < 0) | (self.indices >= n)
    if bad.any():
      raise ValueError(f"indices must lie in [0, {n}) for a source of {n} "
                       f"examples; got {self.indices[bad][:5].tolist()}.")
    self.pseudo_labels = None
    if pseudo_labels is not None:
      self.pseudo_labels = np.asarray(pseudo_labels, np.int32).reshape(-1)
      if self.pseudo_labels.shape != self.indices.shape:
        raise ValueError(
            f"pseudo_labels has {self.pseudo_labels.size} entries but "
            f"indices has {self.indices.size}; give one label per index.")
    self.modality = source.modality

  def __len__(self) -> int:
    return int(self.indices.size)

  def __repr__(self) -> str:
    # Deterministic (grain stores it in iterator checkpoints and compares
    # it on restore): the subset's identity, not its memory address.
    digest = _digest(self.indices, self.pseudo_labels)
    return f"SubsetSource({self.source!r}, n={len(self)}, sha1={digest})"

  def __getitem__(self, i: int) -> Record:
    rec = dict(self.source[int(self.indices[i])])
    if self.pseudo_labels is not None:
      rec["pseudo_label"] = np.int32(self.pseudo_labels[i])
    return rec


class _PaddedSource:
  """Pads `source` to `length` with copies of record 0 marked valid=False."""

  def __init__(self, source, length: int):
    self.source, self.length = source, length
    self.modality = source.modality

  def __len__(self) -> int:
    return self.length

  def __repr__(self) -> str:
    return f"PaddedSource({self.source!r}, length={self.length})"

  def __getitem__(self, i: int) -> Record:
    valid = i < len(self.source)
    rec = dict(self.source[int(i) if valid else 0])
    rec["valid"] = np.bool_(valid)
    return rec


class _TripletSource:
  """Row r: the 2 + K records referenced by triplets[r] (None for -1)."""

  def __init__(self, source, triplets: np.ndarray):
    self.source, self.triplets = source, triplets
    self.modality = source.modality

  def __len__(self) -> int:
    return len(self.triplets)

  def __repr__(self) -> str:
    return (f"TripletSource({self.source!r}, n={len(self)}, "
            f"sha1={_digest(self.triplets)})")

  def __getitem__(self, r: int) -> Record:
    return {"records": [None if j < 0 else self.source[int(j)]
                        for j in self.triplets[int(r)]]}


def _digest(*arrays: np.ndarray | None) -> str:
  """Short content hash of index arrays (None entries skipped)."""
  h = hashlib.sha1()
  for a in arrays:
    if a is not None:
      h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:12]


def _shard(shard_index: int | None, shard_count: int | None,
           drop_remainder: bool) -> grain.sharding.ShardOptions:
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= index < count:
    raise ValueError(f"shard_index must be in [0, shard_count={count}); got "
                     f"{index}.")
  return grain.sharding.ShardOptions(shard_index=index, shard_count=count,
                                     drop_remainder=drop_remainder)


def _check_sizes(batch_size: int, image_size: int) -> None:
  if batch_size <= 0 or image_size <= 0:
    raise ValueError("batch_size and image_size must be positive; got "
                     f"batch_size={batch_size}, image_size={image_size}.")


def _loader(source, ops, *, shuffle, seed, num_epochs, shard, worker_count):
  if worker_count and not flags.FLAGS.is_parsed():
    # grain worker processes read absl flags; scripts outside absl.app
    # (notebooks, tests) have not parsed them, so take the defaults.
    flags.FLAGS.mark_as_parsed()
  # A shuffled stream is sampled globally (the loader then reads this
  # process's interleaved positions); a sharded sampler would shuffle each
  # process's block of records separately, a different order per count.
  sampler = grain.samplers.IndexSampler(
      num_records=len(source),
      shard_options=grain.sharding.NoSharding() if shuffle else shard,
      shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  # No reader threads: records are local and small, and grain's thread
  # prefetch polls its futures under the GIL (measured on the 32 px demo
  # split: 0.30 s per batch of 64 with the default 16 threads, 0.16 s with
  # none). JAX's async dispatch already overlaps loading with the step.
  return grain.DataLoader(
      data_source=source, sampler=sampler, operations=ops,
      worker_count=worker_count, shard_options=shard,
      read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))


def paired_loader(source, *, batch_size: int, image_size: int, train: bool,
                  seed: int = 0, num_epochs: int | None = None,
                  indices: Sequence[int] | None = None,
                  pseudo_labels: Sequence[int] | None = None,
                  modalities: Sequence[str] = ("rgb", "other"),
                  shard_index: int | None = None,
                  shard_count: int | None = None, worker_count: int = 0,
                  crop_scale: tuple[float, float] = (0.08, 1.0),
                  drop_remainder: bool = True,
                  with_caption: bool = False) -> grain.DataLoader:
  """Batches of co-registered pairs (or one modality of them).

  Args:
    source: a split from `load_split` (or a SubsetSource).
    batch_size: per-process batch size B.
    image_size: output side S.
    train: True: shuffled, joint random resized crop + flip; False: in
      order, resized only.
    seed: shuffling and augmentation seed.
    num_epochs: passes over the data; None repeats forever.
    indices: restrict to these positions of `source` (curated subset).
    pseudo_labels: one int per entry of `indices`, output as 'pseudo_label'.
    modalities: subset of ('rgb', 'other'); ('rgb',) gives single-modality
      RGB batches, ('other',) non-RGB ones.
    shard_index, shard_count: this process's data shard (default: JAX's).
    worker_count: grain worker processes (0 = in-process).
    crop_scale: area fraction range of the random crop; tiny images want
      e.g. (0.5, 1.0).
    drop_remainder: drop the last incomplete batch.
    with_caption: also output 'caption' strings (B,) (synthetic_rgbd).

  Returns:
    grain.DataLoader yielding the dicts described in the module docstring.
  """
  _check_sizes(batch_size, image_size)
  if indices is not None:
    source = SubsetSource(source, indices, pseudo_labels)
  elif pseudo_labels is not None:
    raise ValueError("pseudo_labels needs indices (one label per index).")
  modalities = tuple(modalities)
  keep = transforms.PASSTHROUGH + (("caption",) if with_caption else ())
  if train:
    aug = transforms.PairedRandomCropFlip(
        image_size, source.modality, modalities, tuple(crop_scale), keep)
  else:
    aug = transforms.PairedResize(image_size, source.modality, modalities,
                                  keep)
  ops = [aug]
  if with_caption and train:
    ops.append(transforms.TextDraws())
  ops.append(grain.transforms.Batch(batch_size, drop_remainder=drop_remainder))
  return _loader(source, ops, shuffle=train, seed=seed, num_epochs=num_epochs,
                 shard=_shard(shard_index, shard_count, True),
                 worker_count=worker_count)


def caption_loader(source, *, batch_size: int, image_size: int, seed: int = 0,
                   num_epochs: int | None = None, **kwargs) -> grain.DataLoader:
  """RGB + caption batches for CLIP pretraining ('caption': str (B,)).

  Same arguments as `paired_loader` (train=True, modalities=('rgb',));
  the trainer tokenises the captions.
  """
  probe = source[0]
  if "caption" not in probe:
    name = getattr(getattr(source, "info", None), "name", type(source))
    raise ValueError(f"Dataset {name!r} has no captions; only "
                     "synthetic_rgbd carries 'caption'.")
  return paired_loader(source, batch_size=batch_size, image_size=image_size,
                       train=True, seed=seed, num_epochs=num_epochs,
                       modalities=("rgb",), with_caption=True, **kwargs)


def embed_loader(source, *, batch_size: int, image_size: int,
                 modalities: Sequence[str] = ("rgb", "other"),
                 indices: Sequence[int] | None = None,
                 pseudo_labels: Sequence[int] | None = None,
                 shard_index: int | None = None,
                 shard_count: int | None = None,
                 worker_count: int = 0) -> grain.DataLoader:
  """One deterministic pass that sees every example exactly once.

  No shuffle, no augmentation (test-time resize), no drop: the split is
  padded to a multiple of batch_size * shard_count so every process yields
  the same number of full batches; 'valid' (B,) is False on padding.
  """
  _check_sizes(batch_size, image_size)
  if indices is not None:
    source = SubsetSource(source, indices, pseudo_labels)
  shard = _shard(shard_index, shard_count, False)
  per_step = batch_size * shard.shard_count
  padded = -(-len(source) // per_step) * per_step
  source = _PaddedSource(source, padded)
  ops = [transforms.PairedResize(image_size, source.modality,
                                 tuple(modalities)),
         grain.transforms.Batch(batch_size, drop_remainder=False)]
  return _loader(source, ops, shuffle=False, seed=0, num_epochs=1,
                 shard=shard, worker_count=worker_count)


def triplet_loader(source, triplets: np.ndarray, *, batch_size: int,
                   image_size: int, seed: int = 0, num_epochs: int | None = 1,
                   shuffle: bool = True,
                   pseudo_labels: np.ndarray | None = None,
                   modalities: Sequence[str] = ("rgb", "other"),
                   shard_index: int | None = None,
                   shard_count: int | None = None, worker_count: int = 0,
                   crop_scale: tuple[float, float] = (0.08, 1.0),
                   drop_remainder: bool = True) -> grain.DataLoader:
  """Reloads mined (anchor, positive, negatives) groups with fresh crops.

  Args:
    source: the full split source the triplet indices refer to.
    triplets: int (n, 2 + K): anchor, positive, then K negatives as
      positions in `source`; -1 marks a missing negative.
    pseudo_labels: optional int (len(source),) pseudo-label per example of
      the full split, output as 'pseudo_label' (B, 2 + K).
    Other arguments as in `paired_loader`.

  Returns:
    grain.DataLoader of {'rgb'/'other': float32 (B, 2 + K, S, S, 3),
    'label', 'index': int32 (B, 2 + K), 'mask': bool (B, 2 + K)}.
  """
  _check_sizes(batch_size, image_size)
  triplets = np.asarray(triplets)
  if triplets.ndim != 2 or triplets.shape[1] < 3:
    raise ValueError("triplets must be (n, 2 + K) with K >= 1 (anchor, "
                     f"positive, negatives); got shape {triplets.shape}.")
  if len(triplets) == 0:
    raise ValueError("triplets is empty: mining found no valid anchor.")
  if (triplets[:, :2] < 0).any():
    raise ValueError("every triplet needs an anchor and a positive (columns "
                     "0 and 1 must be >= 0); -1 is only for negatives.")
  if (triplets >= len(source)).any():
    raise ValueError(f"triplet indices must be < len(source)={len(source)};"
                     f" got max {int(triplets.max())}.")
  if pseudo_labels is not None:
    source = SubsetSource(source, np.arange(len(source)), pseudo_labels)
  grouped = _TripletSource(source, triplets.astype(np.int64))
  ops = [transforms.TripletRandomCropFlip(
      image_size, source.modality, tuple(modalities), tuple(crop_scale)),
         grain.transforms.Batch(batch_size, drop_remainder=drop_remainder)]
  return _loader(grouped, ops, shuffle=shuffle, seed=seed,
                 num_epochs=num_epochs,
                 shard=_shard(shard_index, shard_count, True),
                 worker_count=worker_count)
