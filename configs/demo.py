r"""The whole EdgeVL pipeline on the synthetic RGB-D dataset, on a CPU.

  python -m edgevl_jax.main --config=configs/demo.py --workdir=workdirs/demo
  python -m edgevl_jax.main --config=configs/demo.py:quick --workdir=/tmp/q

Stages: clip_pretrain (a tiny CLIP teacher learnt from the synthetic RGB
images and their captions, saved as an HF checkpoint) -> pseudo_labels
(teacher zero-shot on the train RGB images over a superset vocabulary, keep
the most confident half) -> dual_modality_kd (ViT student on [depth; RGB]
pulled to the teacher's RGB embedding) -> qat_contrastive (int8 QAT with
offline semi-hard triplets) -> evaluate (zero-shot top-1 per modality on
test) -> export (static int8 student + text features + sizes).

The class of a synthetic scene lives in its geometry; colours and textures
are random nuisances. The teacher, trained on RGB only, is much worse on
depth than on RGB; the student closes most of that gap on depth.

Args (comma separated): quick (a much smaller run used by the tests),
seed=N, data_dir=PATH, student=ghostnetv3_100 (the re-parameterisable
GhostNetV3 CNN student instead of the ViT; it needs 64 px scenes, so the
data and the teacher are 64 px too, with the same 2 x 2 teacher token grid
of 32 px patches).
"""
from edgevl_jax.presets import edgevl as presets
from edgevl_jax.run import config as config_lib

IMAGE_SIZE = 32
# 32 px scenes: train / validation / test sizes (rendering is part of the run).
DEMO_DATA = "custom_32px_2400_300_600"
QUICK_DATA = "custom_32px_960_120_240"


def get_config(arg=None):
  args = config_lib.parse_arg(arg, quick=False, seed=0,
                              data_dir="workdirs/tfds", student="vit_ti16")
  if args.student not in ("vit_ti16", "ghostnetv3_100"):
    raise ValueError(f"config arg student={args.student!r}; choose vit_ti16 "
                     "or ghostnetv3_100.")
  ghost = args.student == "ghostnetv3_100"
  size = 64 if ghost else IMAGE_SIZE
  quick = args.quick
  teacher = "@clip_pretrain/teacher_path"
  # Patch 16 on 32 px images (2 x 2 tokens + CLS), as ViT-B/16 sees a
  # 64 px image. Measured with the supervised proxy of this UniCL stage
  # (seed 0, 2,400 train images, CPU seconds): patch 4 / width 64 / 2
  # layers reached 18% test top-1 in 126 s, patch 8 / 128 / 4 35% in
  # 145 s, patch 16 / 128 / 4 74% in 145 s: from scratch on a few thousand
  # images, fewer and wider tokens learn shape far faster per CPU-second.
  clip_model = dict(vision_width=128, vision_layers=4, vision_heads=4,
                    patch_size=size // 2, text_width=64, text_layers=1,
                    text_heads=4,
                    projection_dim=64, max_length=24, vocab_size=400,
                    hidden_act="gelu")
  # Same token grid for the student: with patch 8 it reached 19% depth
  # top-1 in 400 proxy steps, with patch 16 44%. This config, seed 0:
  # teacher 67.3% RGB / 12.3% depth, student depth 62.7%, int8 static
  # 62.7% depth / 48.0% RGB (fp32 47.3%); 283 s on an idle 2-core CPU.
  student = dict(name="vit_ti16", normalization="clip", overrides=dict(
      image_size=IMAGE_SIZE, patch_size=16, width=128, depth=4, num_heads=4,
      drop_path_rate=0.0))
  if ghost:
    student = dict(name="ghostnetv3_100", normalization="clip",
                   overrides=dict(image_size=size))
  steps = (lambda full, small: small if quick else full)
  stages = [presets.clip_pretrain(
      model=clip_model, batch_size=64, num_steps=steps(1000, 400),
      log_every=100, prompt_fraction=1.0,
      # lr 1e-3 with 50 warmup steps (proxy at 1,000 steps: 69% vs 62% at
      # 2e-3).
      optim=dict(name="adamw", lr=1e-3, end_lr=1e-5, schedule="cosine",
                 warmup_steps=50, weight_decay=0.05, grad_clip_norm=1.0))]
  stages += presets.edgevl_stages(
      teacher=teacher, kept_fraction=0.5, crop_scale=(0.5, 1.0),
      kd=dict(student=student, batch_size=64,
              num_steps=steps(500, 200), eval_every=steps(250, 200),
              log_every=100,
              optim=dict(presets.STAGE1_OPTIM, lr=1e-3, end_lr=5e-5)),
      qat=dict(batch_size=8, num_steps=steps(40, 10),
               eval_every=steps(40, 10), log_every=10,
               optim=dict(presets.STAGE2_OPTIM, lr=1e-5, end_lr=1e-6)))
  return presets.pipeline(
      stages, dataset="synthetic_rgbd", data_dir=args.data_dir,
      data_config=(QUICK_DATA if quick else DEMO_DATA).replace(
          "32px", f"{size}px"), image_size=size,
      seed=args.seed)
