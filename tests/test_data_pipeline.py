"""grain pipelines: joint augmentation, modes, sharding, resumption, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax import data
from edgevl_jax.data import transforms
from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import mesh as mesh_lib


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
  return data.load_split("synthetic_rgbd", "train", data_dir=tiny_dir,
                         config="tiny")


def _source(records, split="train"):
  convert = lambda raw, i: dict(raw, index=i)
  return data.PairedSource(records, convert,
                           info=data.get_info("synthetic_rgbd"), split=split)


def _asymmetric_rgb(seed, h=20, w=28):
  """Random smooth image whose red channel spans exactly 0..255."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  red = (xx * 3 + yy + rng.integers(0, 5, (h, w))).astype(np.float64)
  red = np.round(255 * (red - red.min()) / (red.max() - red.min()))
  rgb = np.stack([red, rng.integers(0, 256, (h, w)), 255 - red], -1)
  return rgb.astype(np.uint8)


def test_crop_and_flip_are_identical_across_modalities():
  # 'other' is the red channel as depth in mm; min-max maps it back to
  # red / 255, so after a shared crop + flip both outputs must agree.
  recs = []
  for i in range(12):
    rgb = _asymmetric_rgb(i)
    recs.append({"rgb": rgb, "other": rgb[..., 0].astype(np.uint16) * 3 + 700,
                 "label": i % 3})
  loader = data.paired_loader(_source(recs), batch_size=12, image_size=16,
                              train=True, seed=4, num_epochs=1)
  b = next(iter(loader))
  # Tolerance: uint8 RGB resize rounds to 1/255 with 8-bit PIL weights.
  np.testing.assert_allclose(b["other"][..., 0], b["rgb"][..., 0], atol=6e-3)
  np.testing.assert_array_equal(b["other"][..., 0], b["other"][..., 2])
  # The check has teeth: a flipped or re-cropped view does not agree.
  assert np.abs(b["other"][..., ::-1, 0] - b["rgb"][..., 0]).mean() > 0.05
  # Crops differ between examples and from the full-image resize.
  full = data.paired_loader(_source(recs), batch_size=12, image_size=16,
                            train=False, num_epochs=1)
  assert np.abs(next(iter(full))["rgb"] - b["rgb"]).mean() > 0.02


def test_output_contract_and_test_time_resize(tiny):
  b = next(iter(data.paired_loader(tiny, batch_size=6, image_size=20,
                                   train=False, num_epochs=1)))
  assert set(b) == {"rgb", "other", "label", "index"}
  for k in ("rgb", "other"):
    assert b[k].shape == (6, 20, 20, 3) and b[k].dtype == np.float32
    assert 0.0 <= b[k].min() and b[k].max() <= 1.0
  assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
  np.testing.assert_array_equal(b["index"], np.arange(6))
  # Depth is per-image min-max: each image spans [0, 1] before resizing.
  unit = transforms.other_to_unit(tiny[0]["other"], "depth")
  assert unit.min() == 0.0 and unit.max() == 1.0


def test_single_modality_and_caption_modes(tiny):
  b = next(iter(data.paired_loader(tiny, batch_size=4, image_size=16,
                                   train=True, modalities=("other",))))
  assert "rgb" not in b and b["other"].shape == (4, 16, 16, 3)
  c = next(iter(data.caption_loader(tiny, batch_size=4, image_size=16)))
  names = data.get_info("synthetic_rgbd").class_names
  assert c["caption"].shape == (4,) and "other" not in c
  assert all(names[l] in cap for l, cap in zip(c["label"], c["caption"]))


def test_seed_determinism_and_epochs(tiny):
  def first(seed, n=3):
    it = iter(data.paired_loader(tiny, batch_size=8, image_size=16,
                                 train=True, seed=seed, num_epochs=1))
    return [next(it) for _ in range(n)]
  a, b, c = first(1), first(1), first(2)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["index"], c[0]["index"])
  batches = list(data.paired_loader(tiny, batch_size=8, image_size=8,
                                    train=True, seed=0, num_epochs=2))
  assert len(batches) == 2 * 120 // 8
  first_epoch = np.concatenate([x["index"] for x in batches[:15]])
  assert sorted(first_epoch.tolist()) == list(range(120))


def test_embed_pass_sees_every_example_once_across_shards(tiny):
  seen, counts = [], []
  for shard in range(2):
    batches = list(data.embed_loader(tiny, batch_size=16, image_size=8,
                                     shard_index=shard, shard_count=2))
    counts.append(len(batches))
    for b in batches:
      assert b["rgb"].shape[0] == 16 and b["valid"].dtype == np.bool_
      seen += b["index"][b["valid"]].tolist()
  assert counts[0] == counts[1] == 4  # 120 padded to 128 = 2 shards x 4 x 16
  assert sorted(seen) == list(range(120))


def test_two_process_training_batches_union_to_the_one_process_batch(tiny):
  # Global batch 8 on 1 process vs 4 + 4 on 2 processes: every step holds
  # the same examples, with the same crop / flip / text draws.
  def steps(loader, n=3):
    it = iter(loader)
    return [next(it) for _ in range(n)]

  kw = dict(batch_size=8, image_size=8, seed=5)
  one = steps(data.caption_loader(tiny, shard_index=0, shard_count=1, **kw))
  two = [steps(data.caption_loader(tiny, shard_index=p, shard_count=2,
                                   **dict(kw, batch_size=4)))
         for p in range(2)]
  for k, b in enumerate(one):
    parts = [two[0][k], two[1][k]]
    index = np.concatenate([p["index"] for p in parts])
    assert sorted(index.tolist()) == sorted(b["index"].tolist())
    order = {int(i): j for j, i in enumerate(b["index"])}
    pos = [order[int(i)] for i in index]
    for name in ("rgb", "text_draw"):
      np.testing.assert_array_equal(
          np.concatenate([p[name] for p in parts]), b[name][pos])
  # Different steps see different examples (the check has teeth).
  assert set(one[0]["index"].tolist()) != set(one[1]["index"].tolist())


def test_subset_with_pseudo_labels(tiny):
  idx = np.array([3, 17, 40, 41, 99, 100, 5, 64])
  pl = np.array([7, 6, 5, 4, 3, 2, 1, 0])
  b = next(iter(data.paired_loader(tiny, batch_size=8, image_size=8,
                                   train=True, indices=idx, pseudo_labels=pl)))
  lookup = dict(zip(idx.tolist(), pl.tolist()))
  assert sorted(b["index"].tolist()) == sorted(idx.tolist())
  assert all(lookup[i] == p for i, p in zip(b["index"], b["pseudo_label"]))


def test_triplet_batches_with_missing_negatives(tiny):
  trip = np.array([[0, 1, 2, 3], [4, 5, -1, -1], [6, 7, 8, -1],
                   [9, 10, 11, 12]])
  pl = np.arange(len(tiny)) % 5
  b = next(iter(data.triplet_loader(tiny, trip, batch_size=4, image_size=12,
                                    seed=0, pseudo_labels=pl)))
  assert b["rgb"].shape == (4, 4, 12, 12, 3) == b["other"].shape
  rows = {tuple(r) for r in b["index"].tolist()}
  assert rows == {tuple(r) for r in trip.tolist()}
  np.testing.assert_array_equal(b["mask"], b["index"] >= 0)
  assert np.all(b["rgb"][~b["mask"]] == 0)
  assert np.all(b["rgb"][b["mask"]].reshape(b["mask"].sum(), -1).max(1) > 0)
  np.testing.assert_array_equal(b["pseudo_label"][b["mask"]],
                                pl[b["index"][b["mask"]]])


def test_checkpointed_iterator_resumes_mid_epoch_exactly(tiny, tmp_path):
  # What the trainers do: the grain iterator's position is saved with the
  # train state by the training checkpointer and set on a fresh iterator.
  make = lambda: data.paired_loader(tiny, batch_size=8, image_size=8,
                                    train=True, seed=3)
  it = iter(make())
  for _ in range(4):  # 4 of the 15 batches of an epoch
    next(it)
  state = {"step": jnp.asarray(4, jnp.int32)}
  with checkpoint_lib.Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(state, step=4, data_iterator=it)
  expected = [next(it) for _ in range(20)]  # crosses the epoch boundary
  fresh = iter(make())
  with checkpoint_lib.Checkpointer(tmp_path) as ckpt:
    restored, _ = ckpt.restore_latest(state, data_iterator=fresh)
  assert int(restored["step"]) == 4
  for e in expected:
    r = next(fresh)
    np.testing.assert_array_equal(e["index"], r["index"])
    np.testing.assert_array_equal(e["rgb"], r["rgb"])
  # The check has teeth: an iterator that was not restored differs.
  assert not np.array_equal(next(iter(make()))["index"],
                            expected[0]["index"])


def test_per_host_shards_assemble_the_global_batch_on_the_mesh(tiny):
  # Two simulated hosts of a (data 4, fsdp 2) mesh: host p loads shard p of
  # 2 and owns devices 4p..4p+3; the global batch is host 0's rows then
  # host 1's, and together they are the 1-process batch of the same step.
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  kw = dict(image_size=8, train=True, seed=5)
  hosts = [next(iter(data.paired_loader(tiny, batch_size=8, shard_index=p,
                                        shard_count=2, **kw)))
           for p in range(2)]
  one = next(iter(data.paired_loader(tiny, batch_size=16, shard_index=0,
                                     shard_count=1, **kw)))
  local = {k: np.concatenate([h[k] for h in hosts]) for k in hosts[0]}
  assert sorted(local["index"].tolist()) == sorted(one["index"].tolist())
  g = mesh_lib.shard_batch(local, mesh)
  assert isinstance(g["rgb"], jax.Array) and g["rgb"].shape == (16, 8, 8, 3)
  assert g["rgb"].sharding.spec == jax.sharding.PartitionSpec(
      ("data", "fsdp"))
  shards = sorted(g["index"].addressable_shards,
                  key=lambda s: s.index[0].start)
  assert len(shards) == 8
  for d, shard in enumerate(shards):
    host = hosts[d // 4]
    np.testing.assert_array_equal(np.asarray(shard.data),
                                  host["index"][2 * (d % 4):2 * (d % 4) + 2])
  np.testing.assert_array_equal(np.asarray(g["rgb"]), local["rgb"])


def test_bad_inputs_name_the_problem(tiny, tiny_dir):
  rgb = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="missing modality/field 'other'"):
    _source([{"rgb": rgb, "other": None, "label": 0}])[0]
  with pytest.raises(ValueError, match=r"image sizes differ: rgb \(8, 8\)"):
    _source([{"rgb": rgb, "other": np.zeros((6, 8)), "label": 0}])[0]
  with pytest.raises(ValueError, match=r"'rgb' must be \(H, W, 3\)"):
    _source([{"rgb": rgb[..., :2], "other": np.zeros((8, 8)), "label": 0}])[0]
  with pytest.raises(ValueError, match="is empty"):
    _source([])
  with pytest.raises(ValueError, match="no split 'val'"):
    data.load_split("synthetic_rgbd", "val", data_dir=tiny_dir,
                    config="tiny")
  with pytest.raises(ValueError, match="indices is empty"):
    data.paired_loader(tiny, batch_size=2, image_size=8, train=True,
                       indices=[])
  with pytest.raises(ValueError, match="give one label per index"):
    data.paired_loader(tiny, batch_size=2, image_size=8, train=True,
                       indices=[1, 2], pseudo_labels=[0])
  with pytest.raises(ValueError, match=r"triplets must be \(n, 2 \+ K\)"):
    data.triplet_loader(tiny, np.zeros((3, 2), int), batch_size=2,
                        image_size=8)
  with pytest.raises(ValueError, match="modalities must be"):
    next(iter(data.paired_loader(tiny, batch_size=2, image_size=8,
                                 train=False, modalities=("thermal",))))
  with pytest.raises(ValueError, match="Unknown non-RGB modality 'lidar'"):
    transforms.other_to_unit(np.zeros((2, 2)), "lidar")
