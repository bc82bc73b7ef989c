"""dprl: data-efficient reinforcement learning of vision-language models in JAX.

Subpackages, one concept each:
  models/      Qwen2.5-VL in Flax NNX, HF safetensors import/export, partition rules
  sampling/    jitted prefill/decode with a KV cache
  rl/          rewards, advantages (difficulty-weighted kernels), losses, the GRPO learner
  data/        records, readers, grain pipelines, chat templates, the synthetic benchmark
  curation/    offline difficulty curation; RAP selection (CDE, ACE, DRM)
  curriculum/  chained phases and stages
  parallel/    meshes, partition rules, multi-host initialisation
"""

__version__ = "0.1.0"
