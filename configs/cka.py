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
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import registry


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, teacher="", student="", quick=False, pooled=False, kernel="linear",
      data_dir="workdirs/tfds", data_config="demo", split="test",
      image_size=32, max_examples=0)
  return registry.job_config(
      "cka_report", dataset="synthetic_rgbd", data_dir=args.data_dir,
      data_config="tiny" if args.quick else args.data_config,
      split=args.split, image_size=16 if args.quick else args.image_size,
      modalities=("rgb", "depth"), teacher=args.teacher,
      teacher_normalization="clip",
      # Random teacher when teacher='' (clip_pretrain's model keys).
      teacher_model=dict(vision_width=32, vision_layers=4, vision_heads=4,
                         patch_size=4, text_width=32, text_layers=1,
                         text_heads=4, projection_dim=32, max_length=16,
                         hidden_act="gelu"),
      student=args.student,
      # Random student when student=''.
      student_model=dict(name="resnet18", normalization="imagenet",
                         overrides=dict(stage_sizes=(1, 1, 1, 1),
                                        widths=(8, 16, 32, 64), stem_width=8,
                                        cifar_stem=True)),
      batch_size=32 if args.quick else 256, num_minibatches=8,
      max_examples=64 if args.quick and not args.max_examples
      else args.max_examples,
      kernel=args.kernel, pooled=args.pooled)
