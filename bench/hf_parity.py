"""Logit parity with Hugging Face `transformers` on tiny random checkpoints (opt-in, not CI).

Needs torch and transformers beside lowrank_jax (the `peers` extra, best in a separate venv:
`python -m venv peers && peers/bin/pip install -e ".[peers]"`). For each case
transformers builds a random model (initializer_range 0.2, so logits are O(1)) and saves it;
`from_pretrained` loads the directory and both compute float32 logits of the same tokens.
Then the export direction: our model with LoRA adapters moved off zero is written by
`save_pretrained` (adapters folded in) and loaded by transformers.

    python bench/hf_parity.py            # table + bench/results/hf_parity.json

Pass: max |logit difference| <= 1e-4 in every row.
"""

from __future__ import annotations

import os
import sys
import tempfile

import numpy as np

from _common import RESULTS, meta, write_json

try:
  import torch
  import transformers
except ImportError:
  sys.exit('bench/hf_parity.py needs torch and transformers (pip install torch transformers)')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from lowrank_jax import models  # noqa: E402

TOLERANCE = 1e-4
VOCAB, SEQ = 97, 24

CASES = {
    'llama GQA untied, rope_theta 5e5': (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
        num_hidden_layers=3, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    'llama MHA tied, attention+mlp bias': (transformers.LlamaConfig, dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=4,
        num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True)),
    'gpt2 tied': (transformers.GPT2Config, dict(
        vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=3, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0)),
}


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


@nnx.jit
def our_logits(model, tokens):
  return model(tokens)


def main() -> None:
  info = meta()
  torch.manual_seed(0)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, (config_class, kw) in CASES.items():
      config = config_class(initializer_range=0.2, **kw)
      reference = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
      src = os.path.join(tmp, name.replace(' ', '_').replace(',', ''))
      reference.save_pretrained(src, safe_serialization=True)
      ours = models.from_pretrained(src)
      load_diff = float(np.abs(np.asarray(our_logits(ours, tokens)) - hf_logits(reference, tokens)).max())

      # Export: LoRA on q, v and down with B moved off zero, folded in by save_pretrained.
      factory = models.LinearFactory({'q': 'lora', 'v': 'lora', 'down': 'lora'}, {'lora': {'rank': 4, 'alpha': 8}})
      adapted = models.from_pretrained(src, linear_factory=factory)
      key = jax.random.key(1)
      for _, module in nnx.iter_modules(adapted):
        if hasattr(module, 'lora_b'):
          key, sub = jax.random.split(key)
          module.lora_b[...] = 0.2 * jax.random.normal(sub, module.lora_b[...].shape, jnp.float32)
      out = models.save_pretrained(adapted, os.path.join(tmp, 'export_' + os.path.basename(src)), source=src)
      exported = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
      export_diff = float(np.abs(np.asarray(our_logits(adapted, tokens)) - hf_logits(exported, tokens)).max())
      scale = float(np.abs(hf_logits(reference, tokens)).max())
      rows.append({'case': name, 'load_max_abs_diff': load_diff, 'export_lora_max_abs_diff': export_diff,
                   'max_abs_logit': scale, 'pass': max(load_diff, export_diff) <= TOLERANCE})

  print(f'transformers {transformers.__version__}, torch {torch.__version__}, jax {jax.__version__}; '
        f'float32, tokens {tokens.shape}, tolerance {TOLERANCE}')
  print(f'{"case":40s} {"load |dlogit|":>14s} {"export+LoRA":>12s} {"max |logit|":>12s} pass')
  for r in rows:
    print(f'{r["case"]:40s} {r["load_max_abs_diff"]:14.2e} {r["export_lora_max_abs_diff"]:12.2e} '
          f'{r["max_abs_logit"]:12.2f} {r["pass"]}')
  path = write_json(os.path.join(RESULTS, 'hf_parity.json'),
                    {'transformers': transformers.__version__, 'torch': torch.__version__, 'jax': jax.__version__,
                     'tolerance': TOLERANCE, 'rows': rows}, meta=info, indent=2)
  print('wrote', path)
  if not all(r['pass'] for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  main()
