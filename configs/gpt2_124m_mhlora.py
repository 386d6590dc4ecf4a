"""GPT-2 124M + LTE multi-head LoRA as in the motivating project: 4 parallel heads of rank 32,
alpha 128, on the attention linears only, merged every 10 steps.

  python train.py --config configs/gpt2_124m_mhlora.py
"""

from configs import gpt2_recipe


def get_config():
  config = gpt2_recipe.get_config("124m")
  config.optimizer.name = "mhlora"
  config.optimizer.mhlora.layers = "q,k,v,o"
  config.optimizer.mhlora.num_heads = 4
  config.optimizer.mhlora.rank = 32
  config.optimizer.mhlora.alpha = 128.0
  config.optimizer.mhlora.mode = "parallel"
  config.optimizer.mhlora.merge_every = 10
  return config
