r"""CKA heat maps: CLIP teacher blocks x student stages, per modality.

  python -m edgevl_jax.main --config=configs/cka.py:teacher=T,student=S \
      --workdir=DIR
  python -m edgevl_jax.main --config=configs/cka.py:quick --workdir=/tmp/cka

T: an HF CLIP folder or a clip_pretrain workdir (e.g. DEMO/0_clip_pretrain);
S: a dual_modality_kd / qat_contrastive workdir. Either may be left out: the
teacher then is a random tiny CLIP, the student a random tiny ResNet (a
baseline for "how similar are unrelated random networks").

Args (comma separated): teacher=PATH, student=PATH, quick (tiny data, tiny
random models, 64 examples), pooled, kernel=linear|rbf, data_dir=PATH,
data_config=NAME, split=NAME, image_size=N, max_examples=N.
"""
import ml_collections

from edgevl_jax.train import config_utils


def get_config(arg=None):
  args = config_utils.parse_arg(
      arg, teacher="", student="", quick=False, pooled=False, kernel="linear",
      data_dir="workdirs/tfds", data_config="demo", split="test",
      image_size=32, max_examples=0)
  c = ml_collections.ConfigDict()
  c.trainer = "cka"
  c.dataset = "synthetic_rgbd"
  c.data_dir = args.data_dir
  c.data_config = "tiny" if args.quick else args.data_config
  c.split = args.split
  c.image_size = 16 if args.quick else args.image_size
  c.modalities = ["rgb", "depth"]
  c.seed = 0
  c.teacher = args.teacher
  c.teacher_normalization = "clip"
  # Random teacher when teacher='' (clip_pretrain's model keys).
  c.teacher_model = ml_collections.ConfigDict(dict(
      vision_width=32, vision_layers=4, vision_heads=4, patch_size=4,
      text_width=32, text_layers=1, text_heads=4, projection_dim=32,
      max_length=16, hidden_act="gelu"))
  c.student = args.student
  # Random student when student=''.
  c.student_model = ml_collections.ConfigDict(dict(
      name="resnet18", normalization="imagenet", embed_dim=None,
      overrides=dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                     stem_width=8, cifar_stem=True)))
  c.batch_size = 32 if args.quick else 256
  c.num_minibatches = 8
  c.max_examples = 64 if args.quick and not args.max_examples else (
      args.max_examples)
  c.kernel = args.kernel
  c.sigma = ml_collections.FieldReference(None, field_type=float)
  c.teacher_blocks = ml_collections.FieldReference(None, field_type=list)
  c.pooled = args.pooled
  return c
