"""EdgeVL losses against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax import losses


def test_kd_l1_hand_computed():
  # Teacher (1, 2) = [3, 4] -> [0.6, 0.8]; student rows already unit.
  student = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # -> [1, 0], [0, 1]
  teacher = jnp.array([[3.0, 4.0]])
  got = losses.dual_modality_kd_loss(
      student_embeddings=student, teacher_embeddings=teacher, kind="l1")
  # |1-.6|+|0-.8|+|0-.6|+|1-.8| = .4+.8+.6+.2 = 2.0 over 4 elements.
  np.testing.assert_allclose(got, 0.5, rtol=1e-6)
  l2 = losses.dual_modality_kd_loss(
      student_embeddings=student, teacher_embeddings=teacher, kind="l2")
  np.testing.assert_allclose(l2, (.16 + .64 + .36 + .04) / 4, rtol=1e-6)
  cos = losses.dual_modality_kd_loss(
      student_embeddings=student, teacher_embeddings=teacher, kind="cosine")
  np.testing.assert_allclose(cos, ((1 - .6) + (1 - .8)) / 2, rtol=1e-6)


def test_kd_tiles_teacher_in_order():
  t = jax.random.normal(jax.random.key(0), (3, 5))
  s = jnp.concatenate([t * 2.0, t * 0.5])  # same directions, both halves
  assert float(losses.dual_modality_kd_loss(
      student_embeddings=s, teacher_embeddings=t)) < 1e-6
  swapped = jnp.concatenate([t[::-1], t])
  assert float(losses.dual_modality_kd_loss(
      student_embeddings=swapped, teacher_embeddings=t)) > 0.05
  # No gradient into the teacher.
  g = jax.grad(lambda tt: losses.dual_modality_kd_loss(
      student_embeddings=swapped, teacher_embeddings=tt))(t)
  assert float(jnp.abs(g).sum()) == 0.0


def test_kd_errors_name_problem():
  with pytest.raises(ValueError, match="kind must be one of"):
    losses.dual_modality_kd_loss(student_embeddings=jnp.ones((2, 2)),
                                 teacher_embeddings=jnp.ones((1, 2)), kind="l3")
  with pytest.raises(ValueError, match="embed_dim"):
    losses.dual_modality_kd_loss(student_embeddings=jnp.ones((2, 3)),
                                 teacher_embeddings=jnp.ones((1, 2)))


def test_triplet_margin_loss_hand_computed():
  a = jnp.array([[1.0, 0.0]])
  p = jnp.array([[0.0, 1.0]])  # d_p = sqrt(2)
  n = jnp.array([[[0.0, 3.0], [-1.0, 0.0], [5.0, 0.0]]])  # d_n: sqrt2, 2, 0
  mask = jnp.array([[True, True, False]])
  got = losses.triplet_margin_loss(anchor=a, positive=p, negatives=n,
                                   negative_mask=mask, margin=0.3)
  r2 = np.sqrt(2.0)
  want = (0.3 + max(r2 - 2.0 + 0.3, 0.0)) / 2  # masked third would add 1.71
  np.testing.assert_allclose(got, want, rtol=1e-5)
  zero = losses.triplet_margin_loss(anchor=a, positive=p, negatives=n,
                                    negative_mask=jnp.zeros((1, 3), bool))
  assert float(zero) == 0.0


def _brute_force_mining(emb, labels, margin):
  emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  d = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
  result = {}
  for i in range(len(emb)):
    pos = [j for j in range(len(emb)) if j != i and labels[j] == labels[i]]
    if not pos:
      continue
    p = min(pos, key=lambda j: d[i, j])
    negs = {j for j in range(len(emb)) if labels[j] != labels[i]
            and d[i, p] < d[i, j] < d[i, p] + margin}
    if negs:
      result[i] = (p, negs)
  return result


def test_offline_mining_matches_brute_force():
  rs = np.random.default_rng(0)
  emb = rs.normal(size=(40, 4)) * rs.uniform(0.5, 3.0, size=(40, 1))
  labels = rs.integers(0, 4, size=40)
  labels[7] = 9  # an anchor without a positive is dropped
  want = _brute_force_mining(emb, labels, 0.3)
  got = losses.offline_semi_hard_triplets(
      emb, labels, margin=0.3, max_negatives=3, rng=1, chunk=16)
  assert 7 not in got["anchor"]
  assert sorted(got["anchor"].tolist()) == sorted(want)
  for a, p, negs, m in zip(got["anchor"], got["positive"], got["negatives"],
                           got["negative_mask"]):
    assert p == want[a][0]
    kept = set(negs[m].tolist())
    assert kept <= want[a][1]
    assert len(kept) == min(3, len(want[a][1])) == m.sum()
  # The unnormalised mining space (public code) mines different triplets.
  raw = losses.offline_semi_hard_triplets(
      emb, labels, margin=0.3, rng=1, normalize=False)
  assert sorted(raw["anchor"].tolist()) != sorted(want)


def test_offline_mining_negative_order_is_random():
  rs = np.random.default_rng(0)
  emb = rs.normal(size=(60, 2))
  labels = np.arange(60) % 2
  a = losses.offline_semi_hard_triplets(emb, labels, margin=1.0, rng=0)
  b = losses.offline_semi_hard_triplets(emb, labels, margin=1.0, rng=5)
  c = losses.offline_semi_hard_triplets(emb, labels, margin=1.0, rng=0)
  np.testing.assert_array_equal(a["negatives"], c["negatives"])
  assert not np.array_equal(a["negatives"], b["negatives"])


def test_online_matches_offline_all_negatives():
  rs = np.random.default_rng(2)
  emb = rs.normal(size=(24, 3)).astype(np.float32)
  labels = rs.integers(0, 3, size=24)
  mined = _brute_force_mining(emb, labels, 0.3)
  e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
  d = np.linalg.norm(e[:, None] - e[None], axis=-1)
  terms = [d[a, p] - d[a, n] + 0.3 for a, (p, negs) in mined.items()
           for n in negs]
  want = np.sum(terms) / len(terms)
  got = jax.jit(lambda x, y: losses.online_semi_hard_triplet_loss(
      embeddings=x, labels=y, margin=0.3))(emb, labels)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # Padding examples are ignored.
  padded = np.concatenate([emb, rs.normal(size=(4, 3)).astype(np.float32)])
  plabels = np.concatenate([labels, [0, 1, 2, 0]])
  valid = np.arange(28) < 24
  got_pad = losses.online_semi_hard_triplet_loss(
      embeddings=padded, labels=plabels, margin=0.3, valid=valid)
  np.testing.assert_allclose(got_pad, want, rtol=1e-4)
  grad = jax.grad(lambda x: losses.online_semi_hard_triplet_loss(
      embeddings=x, labels=labels, margin=0.3))(emb)
  assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0
