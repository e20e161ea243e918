"""TFDS builder of the synthetic RGB-D dataset (no download, no TensorFlow).

Each example is a procedurally rendered scene (render.py): the RGB image, the
aligned depth map (uint16 millimetres, 0 = missing, with sensor-like holes), the geometry class, a caption naming the class and the
nuisance attributes, and the example's position in its split. Tensors are
stored raw (uint8 RGB, uint16 millimetre depth) in array_record files, so
`tfds.data_source` reads them without TensorFlow.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from edgevl_jax.data import tfds_builder
from edgevl_jax.data.synthetic_rgbd import geometry
from edgevl_jax.data.synthetic_rgbd import render

SPLITS = ("train", "validation", "test")
# Depth is stored in millimetres, like the depth PNGs of real RGB-D sensors.
DEPTH_SCALE = 1000.0
# Raw bytes: tf.train.Example int lists would cost 8 bytes and a Python int per
# pixel; bytes decode with numpy only.
_RAW = tfds.features.Encoding.BYTES


@dataclasses.dataclass
class SyntheticRgbdConfig(tfds.core.BuilderConfig):
  """Size and resolution of the generated dataset.

  Attributes:
    image_size: height = width of both modalities, pixels.
    num_train / num_validation / num_test: examples per split.
    seed: every split is a deterministic function of (seed, split).
    depth_holes: strength of real-sensor depth defects (holes stored as 0
      at depth edges and in small patches, 1 % noise); 0 gives clean depth.
      They exist only in depth, which is what makes depth unlike any RGB
      image for a model trained on RGB (render.sensor_artifacts).
  """
  image_size: int = 32
  num_train: int = 4800
  num_validation: int = 600
  num_test: int = 1200
  seed: int = 0
  depth_holes: float = 1.0

  def split_sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "validation": self.num_validation,
            "test": self.num_test}


def make_config(*, image_size: int, num_train: int, num_validation: int,
                num_test: int, seed: int = 0,
                depth_holes: float = 1.0) -> SyntheticRgbdConfig:
  """A custom-sized config; its name encodes every field (one data folder)."""
  name = (f"custom_{image_size}px_{num_train}_{num_validation}_{num_test}"
          f"_seed{seed}_holes{depth_holes:g}")
  return SyntheticRgbdConfig(
      name=name, description="custom size", image_size=image_size,
      num_train=num_train, num_validation=num_validation, num_test=num_test,
      seed=seed, depth_holes=depth_holes)


class Builder(tfds_builder.OwnCodePath,
              tfds.core.GeneratorBasedBuilder):
  """Rendered RGB-D scenes whose class is carried by geometry only."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Sphere-traced scenes, 12 geometry classes.",
                   "1.1.0": "Depth-sensor holes and noise (depth_holes)."}
  BUILDER_CONFIGS = [
      SyntheticRgbdConfig(name="demo", description="32 px, CPU demo size."),
      SyntheticRgbdConfig(name="demo48", description="48 px demo size.",
                          image_size=48),
      SyntheticRgbdConfig(name="small", description="64 px, 12k train.",
                          image_size=64, num_train=12000,
                          num_validation=1200, num_test=2400),
      SyntheticRgbdConfig(name="large", description="128 px, 48k train.",
                          image_size=128, num_train=48000,
                          num_validation=2400, num_test=4800),
      SyntheticRgbdConfig(name="tiny", description="16 px, tests.",
                          image_size=16, num_train=120, num_validation=24,
                          num_test=48),
  ]
  DEFAULT_CONFIG_NAME = "demo"
  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "rgb": tfds.features.Tensor(shape=(size, size, 3),
                                        dtype=np.uint8, encoding=_RAW),
            "depth": tfds.features.Tensor(shape=(size, size),
                                          dtype=np.uint16, encoding=_RAW),
            "label": tfds.features.ClassLabel(names=geometry.CLASS_NAMES),
            "caption": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int32),
        }),
        supervised_keys=None,
        # Keep generation order, so the stored 'index' is the record position.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated locally.
    sizes = self.builder_config.split_sizes()
    return {name: self._generate_examples(name, sizes[name])
            for name in SPLITS}

  def _generate_examples(self, split: str, num_examples: int):
    if num_examples <= 0:
      raise ValueError(
          f"synthetic_rgbd split {split!r} has {num_examples} examples; "
          "every split needs at least one (set num_train/num_validation/"
          "num_test > 0).")
    cfg = self.builder_config
    seed = (cfg.seed, SPLITS.index(split))
    for i, rgb, depth, label, caption in render.generate(
        num_examples, cfg.image_size, seed, depth_holes=cfg.depth_holes):
      # 0 = no measurement (a hole), as in real sensors' depth PNGs.
      mm = np.clip(np.round(depth * DEPTH_SCALE), 0, 65535).astype(np.uint16)
      yield i, {"rgb": rgb, "depth": mm, "label": label, "caption": caption,
                "index": i}
