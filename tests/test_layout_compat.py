"""A stage-1 checkpoint written by the previous layout (edgevl_jax.train)
restores in today's runner: train state, typed-key rng and data position.

tests/data/v0_1_stage1 was written by the code before the runner redesign
(configs/demo.py:quick with a 4-step tiny stage 1 on 64 synthetic scenes).
"""
import json
import pathlib
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np

from edgevl_jax import data as data_lib
from edgevl_jax.edgevl import handoff
from edgevl_jax.run import checkpoint as checkpoint_lib
from edgevl_jax.run import mesh as mesh_lib
from edgevl_jax.run import optim as optim_lib
from edgevl_jax.run import registry
from edgevl_jax.run import state as state_lib

FIXTURE = pathlib.Path(__file__).parent / "data" / "v0_1_stage1"


def test_previous_layout_stage1_checkpoint_restores(tmp_path):
  work = tmp_path / "stage1"
  shutil.copytree(FIXTURE, work)
  saved = json.loads((work / "config.json").read_text())
  config = registry.complete({**saved, "trainer": "dual_modality_kd",
                              "data_dir": str(tmp_path / "tfds")})
  model, best_params, meta = handoff.load_student(str(work))
  tx = optim_lib.make_optimizer(config.optim, config.num_steps)
  dummy = jnp.zeros((1, config.image_size, config.image_size, 3))
  state, _ = state_lib.create_train_state(
      lambda k: model.init(k, dummy), tx, jax.random.key(config.seed),
      mesh=mesh_lib.make_mesh(), rules=mesh_lib.REPLICATED_RULES)
  # The same stream the old run read: 64 scenes, all kept, seed 0.
  source = data_lib.load_split("synthetic_rgbd", "train",
                               data_dir=config.data_dir,
                               config="custom_32px_64_16_16")
  loader = data_lib.paired_loader(
      source, batch_size=8, image_size=32, train=True, seed=0,
      indices=np.arange(64), crop_scale=(0.5, 1.0))
  iterator = iter(loader)
  with checkpoint_lib.Checkpointer(work / "checkpoints") as ckpt:
    restored, _ = ckpt.restore_latest(state, iterator)
  assert int(restored.step) == 4
  assert restored.rng.dtype == state.rng.dtype  # typed key, as saved
  # The checkpoint at step 4 holds the student selected at step 4.
  flat = flax.traverse_util.flatten_dict(jax.device_get(restored.params))
  best = flax.traverse_util.flatten_dict(best_params)
  assert flat.keys() == best.keys()
  for key in flat:
    np.testing.assert_array_equal(flat[key], best[key])
  # The data position resumes: the next batch is the stream's 5th.
  fresh = iter(data_lib.paired_loader(
      source, batch_size=8, image_size=32, train=True, seed=0,
      indices=np.arange(64), crop_scale=(0.5, 1.0)))
  for _ in range(4):
    next(fresh)
  np.testing.assert_array_equal(next(iterator)["rgb"], next(fresh)["rgb"])
  assert meta["name"] == "vit_ti16"
