"""Supervised classifiers (the teachers of data-free distillation).

  python -m edgevl_jax.main --config=configs/classifier.py --workdir=DIR
  python -m edgevl_jax.main --config=configs/classifier.py:cifar100 ...

No arg: three width-reduced ResNet-18s (CIFAR stem) on sklearn_digits, about
2 minutes on a 2-core CPU for 4 epochs (test accuracy ~98 %). `cifar100`:
the paper's three ResNet-34 teachers (SGD 0.1, momentum 0.9, weight decay
5e-4, 200 epochs, step decay) on a prepared TFDS `cifar100` (needs the
'prepare' extra once).
"""
import ml_collections

from edgevl_jax.train import config_utils

# Width-reduced ResNet-18 with the CIFAR stem: runs on a CPU in minutes.
CPU_TEACHER = dict(stage_sizes=(1, 1, 1, 1), widths=(8, 16, 32, 64),
                   stem_width=8, cifar_stem=True, image_size=32)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = config_utils.parse_arg(arg, cifar100=False, epochs=0,
                                data_dir="/tmp/tfds")
  c = ml_collections.ConfigDict()
  c.trainer = "classifier"
  c.data_dir = args.data_dir
  c.seed = 0
  c.num_models = 3
  c.log_every = 20
  c.ckpt_every = ml_collections.config_dict.placeholder(int)
  c.augment = ml_collections.ConfigDict(dict(crop_padding=2, flip=False))
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine"))
  if args.cifar100:
    c.dataset = "cifar100"
    c.image_size = 32
    c.model = ml_collections.ConfigDict(dict(
        name="resnet34", overrides=dict(cifar_stem=True, image_size=32)))
    c.batch_size = 128
    c.num_epochs = args.epochs or 200
    c.optim.schedule = "step"
    steps_per_epoch = 50000 // c.batch_size
    c.optim.milestones = [m * steps_per_epoch for m in (60, 120, 160)]
    c.augment.crop_padding = 4
    c.augment.flip = True
  else:
    c.dataset = "sklearn_digits"
    c.image_size = 32
    c.model = ml_collections.ConfigDict(dict(name="resnet18",
                                             overrides=dict(CPU_TEACHER)))
    c.batch_size = 64
    c.num_epochs = args.epochs or 8
  return c
