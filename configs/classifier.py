"""Supervised classifiers (the teachers of data-free distillation).

  python -m edgevl_jax.main --config=configs/classifier.py --workdir=DIR
  python -m edgevl_jax.main --config=configs/classifier.py:cifar100 ...

No arg: three width-reduced ResNet-18s (CIFAR stem) on sklearn_digits, about
2 minutes on a 2-core CPU for 4 epochs (test accuracy ~98 %). `cifar100`:
the paper's three ResNet-34 teachers (SGD 0.1, momentum 0.9, weight decay
5e-4, 200 epochs, step decay) on a prepared TFDS `cifar100` (needs the
'prepare' extra once).
"""
from edgevl_jax.presets import classification as presets
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import registry


def get_config(arg=None):
  args = config_lib.parse_arg(arg, cifar100=False, epochs=0,
                              data_dir="/tmp/tfds")
  return registry.job_config("classifier", **presets.classifier(
      data_dir=args.data_dir, cifar100=args.cifar100, epochs=args.epochs))
