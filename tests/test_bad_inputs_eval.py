"""Zero-shot evaluation: a student / teacher size mismatch names both sizes;
a stage's student files that are corrupt are named."""
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from edgevl_jax.edgevl import handoff
from edgevl_jax.edgevl import zero_shot

META = dict(name="vit_ti16", embed_dim=8, normalization="clip",
            overrides=dict(image_size=16, patch_size=8, width=16, depth=1,
                           num_heads=2))


def test_check_embed_dim_names_both_sizes_up_front():
  text = np.ones((5, 16), np.float32)
  zero_shot.check_embed_dim(16, text)
  zero_shot.check_embed_dim(16, 16)  # the teacher's projection_dim
  with pytest.raises(ValueError, match=r"^the student embeds images into 8 "
                     r"dims but the teacher's text features are 16-dim; "
                     r".*embed_dim=16 \(the teacher's projection_dim\)"):
    zero_shot.check_embed_dim(META["embed_dim"], text)


def test_accuracy_and_probabilities_name_both_shapes():
  img, text = np.ones((4, 8)), np.ones((3, 16))
  want = (r"image_features are 8-dim \(shape \(4, 8\)\) but text_features "
          r"are 16-dim \(shape \(3, 16\)\)")
  with pytest.raises(ValueError, match=want):
    zero_shot.topk_accuracy(img, text, np.zeros(4, int))
  with pytest.raises(ValueError, match=want):
    zero_shot.zero_shot_probabilities(img, text)
  with pytest.raises(ValueError, match="must both be 2-D"):
    zero_shot.zero_shot_probabilities(np.ones(8), text)


def _save(workdir, params):
  handoff.save_student(str(workdir), meta=META, params=params)


def test_corrupt_student_files_are_named(tmp_path):
  model = handoff.build_student(META)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  params = flax.linen.unbox(params)
  _save(tmp_path, params)
  _, loaded, meta = handoff.load_student(str(tmp_path))
  assert meta["embed_dim"] == 8
  # NaN params (a diverged run) are named.
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  name = sorted(flat)[0]
  flat[name] = np.asarray(flat[name]).copy()
  flat[name].reshape(-1)[:2] = np.nan
  _save(tmp_path, flax.traverse_util.unflatten_dict(flat, sep="/"))
  file = os.path.join(tmp_path, handoff.STUDENT_PARAMS)
  with pytest.raises(ValueError, match=rf"student params '{file}': 1 "
                     rf"tensor\(s\) hold NaN or inf values \('{name}': 2 of"):
    handoff.load_student(str(tmp_path))
  # A truncated params file.
  _save(tmp_path, params)
  blob = open(file, "rb").read()
  open(file, "wb").write(blob[:len(blob) // 3])
  with pytest.raises(ValueError, match=rf"{file} is truncated or corrupt"):
    handoff.load_student(str(tmp_path))
  # An invalid student.json.
  with open(os.path.join(tmp_path, handoff.STUDENT_FILE), "w") as f:
    f.write(json.dumps(META)[:-5])
  with pytest.raises(ValueError, match=r"student.json is not valid JSON .*"
                     "re-run the stage that wrote it"):
    handoff.load_student(str(tmp_path))
