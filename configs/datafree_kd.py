"""Data-free adversarial distillation (CDFKD-MFS, Hao et al. 2022).

  python -m edgevl_jax.main --config=configs/datafree_kd.py --workdir=DIR
  python -m edgevl_jax.main --config=configs/datafree_kd.py:cifar100 \
      --workdir=DIR --config.teachers_dir=TEACHERS_WORKDIR

No arg: the CPU-scale pipeline on sklearn_digits (a small real dataset that
ships with scikit-learn): train three small teachers -> data-free
distillation into a 3-head student (which ends by evaluating teachers and
student on the real test split and fitting the attention aggregation on 2 %
of the training images). Teachers: widths 8-64, 4 epochs (~98 % test
accuracy); distillation: batch 64, 160 iterations, generator ngf 32. About
12 minutes on an idle 2-core CPU (the student reaches ~93 % against a ~99 %
teacher ensemble).

Paper settings (student ResNet-18 multi-head, 3 teachers, nz = 256):
  cifar100:      32 px, batch 256, 300 epochs x 50 iterations, milestones
                 100/200, w_ens 5, w_feat 0.2, CIFAR stem (3x3/1);
  caltech101:    128 px, batch 64, same schedule, w_ens 5, w_feat 0.2,
                 ImageNet stem (7x7/2 + max-pool);
  mini_imagenet: 224 px, batch 64, 100 epochs x 750 iterations, milestones
                 30/60/90, w_ens 1, w_feat 0.05, ImageNet stem.
These need teachers trained on the real data (`teachers_dir`, a
'classifier' workdir) and the dataset prepared under `data_dir` for the
final evaluation. `quick` shrinks the default pipeline for tests.
"""
from edgevl_jax.presets import classification as presets
from edgevl_jax.run import config as config_lib
from edgevl_jax.run import registry


def get_config(arg=None):
  args = config_lib.parse_arg(
      arg, cifar100=False, caltech101=False, mini_imagenet=False, quick=False,
      data_dir="/tmp/tfds")
  chosen = [k for k in presets.DATAFREE_PAPER if args[k]]
  if len(chosen) > 1:
    raise ValueError(f"configs/datafree_kd.py: choose one of "
                     f"{list(presets.DATAFREE_PAPER)}, found {chosen}.")
  if chosen:
    return registry.job_config("datafree_kd", **presets.datafree(
        presets.DATAFREE_PAPER[chosen[0]], data_dir=args.data_dir))
  teachers = presets.classifier(data_dir=args.data_dir)
  teachers["model"]["overrides"] = dict(presets.CPU_TEACHER)
  teachers["num_epochs"] = 4
  if args.quick:
    teachers.update(num_models=2, num_epochs=1)
  return registry.pipeline_config([
      ("teachers", "classifier", teachers),
      ("datafree_kd", "datafree_kd",
       presets.datafree_digits(data_dir=args.data_dir, quick=args.quick))])
