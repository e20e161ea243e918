r"""EdgeVL on a real dataset with the paper's hyper-parameters.

  python -m edgevl_jax.main \
      --config=configs/edgevl.py:dataset=scannet,teacher=PATH --workdir=DIR
  ...:dataset=eurosat|scannet|sun_rgbd|nyuv2,student=vit_s16,teacher=PATH
  ...:student_hf=PATH         start stage 1 from a Hugging Face ImageNet
                              folder of the student's architecture
  ...:runlocal                tiny smoke run (needs the data)

teacher is a Hugging Face CLIP folder (config.json + model.safetensors +
tokenizer files). Stage 1: AdamW 1e-4 cosine to 5e-6, wd 1e-3, clip 5, batch
32 pairs; stage 2: 1e-6 cosine to 5e-7, batch 4 anchors; margin 0.3, 3
negatives. Other args: see `edgevl_jax.presets.edgevl.paper_config`.
"""
from edgevl_jax.presets import edgevl as presets
from edgevl_jax.run import config as config_lib

# dataset -> the curation fraction of the paper's config.
KEPT_FRACTION = {"eurosat": 0.5, "scannet": 0.3, "sun_rgbd": 0.3,
                 "nyuv2": 0.3}


def get_config(arg=None):
  args = config_lib.parse_arg(arg, lazy=True, dataset="scannet")
  if args.dataset not in KEPT_FRACTION:
    raise ValueError(f"config arg dataset={args.dataset!r}; choose one of "
                     f"{sorted(KEPT_FRACTION)}.")
  rest = ",".join(item for item in (arg or "").split(",")
                  if item and not item.startswith("dataset="))
  return presets.paper_config(rest, dataset=args.dataset,
                              kept_fraction=KEPT_FRACTION[args.dataset])
