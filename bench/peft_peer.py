"""PEFT adapters both ways, against PEFT itself (opt-in peer check, not CI: torch is not in our venv).

Our code builds a tiny random LLaMA and GPT-2 and writes them as Hugging Face checkpoints
(`save_pretrained`). Then, for LoRA, DoRA and rsLoRA:

* ours -> PEFT: random adapters on our model, written by `save_adapter`; a second Python with
  torch, transformers and peft (`--peer_python`) loads base + adapter with
  `AutoModelForCausalLM` + `PeftModel.from_pretrained` and writes its logits for fixed tokens.
* PEFT -> ours: that Python makes an adapter with `get_peft_model` (random A and B:
  `init_lora_weights=False`; DoRA magnitudes moved off their init) and `save_pretrained`, with
  its logits; `load_adapter` reads it into our model.

Each row compares float32 logits (max |difference|); "effect" is how far the adapter moves our
logits from the base model's, so a row cannot pass by comparing two base models.

    python bench/peft_peer.py [--peer_python /tmp/peer/bin/python]   # table + bench/results/peft_peer.json

Pass: max |logit difference| <= 1e-4 in every row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import meta, result_path, write_json
from lowrank_jax import models

TOLERANCE = 1e-4
VOCAB, SEQ = 97, 16

# Runs under --peer_python: reads jobs.json, writes one logits .npy per job.
PEER_SCRIPT = r'''
import json, sys
import numpy as np, peft, torch, transformers

jobs = json.load(open(sys.argv[1]))
tokens = torch.as_tensor(np.load(jobs['tokens']), dtype=torch.long)
for job in jobs['jobs']:
  base = transformers.AutoModelForCausalLM.from_pretrained(job['base'], dtype=torch.float32).eval()
  if job['kind'] == 'load':
    model = peft.PeftModel.from_pretrained(base, job['adapter']).eval()
  else:  # create a random adapter, save it
    torch.manual_seed(job['seed'])
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, task_type='CAUSAL_LM', **job['lora']))
    with torch.no_grad():
      for name, p in model.named_parameters():
        if 'lora_magnitude_vector' in name:  # DoRA's init is the weight norm: move it so it matters
          p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.eval()
    model.save_pretrained(job['adapter'])
  with torch.no_grad():
    np.save(job['logits'], model(tokens).logits.float().numpy())
json.dump({'torch': torch.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__},
          open(jobs['versions'], 'w'))
'''

VARIANTS = {'lora': {}, 'dora': {'variant': 'dora'}, 'rslora': {'rank_scaling': 'rslora'}}
PEFT_VARIANTS = {'lora': {}, 'dora': {'use_dora': True}, 'rslora': {'use_rslora': True}}
# Our adapted layers per family (GPT-2 leaves k out: its block of the fused c_attn is zero) and the
# PEFT targets of the reverse direction (GPT-2's c_attn then needs q, k and v at PEFT's rank).
OURS = {'llama': ('q', 'k', 'v', 'o', 'gate', 'up', 'down'), 'gpt2': ('q', 'v', 'o', 'up', 'down')}
PEFT_TARGETS = {'llama': (['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
                          ('q', 'k', 'v', 'o', 'gate', 'up', 'down')),
                'gpt2': (['c_attn', 'c_proj', 'c_fc'], ('q', 'k', 'v', 'o', 'up', 'down'))}
RANK, ALPHA = 4, 8


@nnx.jit
def our_logits(model, tokens):
  return model(tokens)


def base_checkpoints(tmp: str) -> dict[str, str]:
  """Tiny random LLaMA (GQA, untied) and GPT-2 written by our save_pretrained (init_std 0.2: O(1) logits)."""
  out = {}
  llama = models.llama_config('tiny', VOCAB, d_model=64, d_ff=96, n_heads=4, n_kv_heads=2, n_layers=2,
                              max_seq_len=64, init_std=0.2)
  gpt2 = models.gpt2_config('tiny', VOCAB, d_model=64, n_heads=4, n_layers=2, max_seq_len=64, init_std=0.2)
  for name, cls, config in (('llama', models.Llama, llama), ('gpt2', models.GPT2, gpt2)):
    out[name] = models.save_pretrained(cls(config, rngs=nnx.Rngs(0)), os.path.join(tmp, name))
  return out


def adapted_model(base: str, layers, variant: str, layer_options=None):
  factory = models.LinearFactory({n: 'lora' for n in layers},
                                 {'lora': {'rank': RANK, 'alpha': ALPHA, **VARIANTS[variant]}}, layer_options)
  return models.from_pretrained(base, linear_factory=factory)


def randomize(model, seed: int):
  """A and B off their init; DoRA: magnitudes from the loaded kernels' norms, then moved."""
  rng = np.random.default_rng(seed)
  for _, layer in nnx.iter_modules(model):
    if not hasattr(layer, 'lora_a'):
      continue
    for name in ('lora_a', 'lora_b'):
      shape = getattr(layer, name)[...].shape
      getattr(layer, name)[...] = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.1)
    if getattr(layer, 'variant', 'lora') == 'dora':
      layer.init_magnitude()
      m = layer.lora_magnitude[...]
      layer.lora_magnitude[...] = m * jnp.asarray(rng.uniform(0.5, 1.5, m.shape).astype(np.float32))
  return model


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--peer_python', default='/tmp/peer/bin/python', help='a Python with torch, transformers, peft')
  args = parser.parse_args()
  info = meta(args)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (2, SEQ)).astype(np.int32)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    bases = base_checkpoints(tmp)
    np.save(os.path.join(tmp, 'tokens.npy'), tokens)
    base_logits = {f: np.asarray(our_logits(models.from_pretrained(p), tokens)) for f, p in bases.items()}
    jobs, ours, cases = [], {}, []
    for family, base in bases.items():
      for variant in VARIANTS:
        case = f'{family}_{variant}'
        # ours -> PEFT
        model = randomize(adapted_model(base, OURS[family], variant), seed=len(jobs))
        ours[case] = np.asarray(our_logits(model, tokens))
        adapter = models.save_adapter(model, os.path.join(tmp, 'ours_' + case))
        jobs.append({'kind': 'load', 'base': base, 'adapter': adapter, 'logits': os.path.join(tmp, f'peer_{case}.npy')})
        # PEFT -> ours (LLaMA's plain LoRA also with a rank_pattern / alpha_pattern entry)
        targets, _ = PEFT_TARGETS[family]
        lora = {'r': RANK, 'lora_alpha': ALPHA, 'target_modules': targets, **PEFT_VARIANTS[variant]}
        if family == 'gpt2':
          lora['fan_in_fan_out'] = True
        if case == 'llama_lora':
          lora.update(rank_pattern={'down_proj': 2}, alpha_pattern={'down_proj': 3})
        jobs.append({'kind': 'create', 'base': base, 'lora': lora, 'seed': len(jobs),
                     'adapter': os.path.join(tmp, 'peft_' + case), 'logits': os.path.join(tmp, f'peft_{case}.npy')})
        cases.append((family, variant, case))
    script = os.path.join(tmp, 'peer.py')
    with open(script, 'w') as f:
      f.write(PEER_SCRIPT)
    job_file = os.path.join(tmp, 'jobs.json')
    with open(job_file, 'w') as f:
      json.dump({'tokens': os.path.join(tmp, 'tokens.npy'), 'versions': os.path.join(tmp, 'versions.json'),
                 'jobs': jobs}, f)
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', JAX_PLATFORMS='cpu')
    run = subprocess.run([args.peer_python, script, job_file], capture_output=True, text=True, env=env)
    if run.returncode:
      sys.exit(f'peer python failed:\n{run.stderr[-4000:]}')
    with open(os.path.join(tmp, 'versions.json')) as f:
      peer_versions = json.load(f)
    # What PEFT / transformers said about our files (a silently skipped tensor would show here).
    peer_warnings = sorted({line.strip() for line in run.stderr.splitlines() if 'Warning' in line})

    for family, variant, case in cases:
      base = bases[family]
      peer = np.load(os.path.join(tmp, f'peer_{case}.npy'))
      rows.append({'direction': 'ours -> PEFT', 'model': family, 'variant': variant,
                   'max_abs_diff': float(np.abs(ours[case] - peer).max()),
                   'effect': float(np.abs(ours[case] - base_logits[family]).max()),
                   'max_abs_logit': float(np.abs(peer).max())})
      _, layers = PEFT_TARGETS[family]
      layer_options = {'down': {'rank': 2, 'alpha': 3.0}} if case == 'llama_lora' else None
      model = adapted_model(base, layers, variant, layer_options)
      models.load_adapter(model, os.path.join(tmp, 'peft_' + case))
      loaded = np.asarray(our_logits(model, tokens))
      peer = np.load(os.path.join(tmp, f'peft_{case}.npy'))
      rows.append({'direction': 'PEFT -> ours', 'model': family, 'variant': variant,
                   'max_abs_diff': float(np.abs(loaded - peer).max()),
                   'effect': float(np.abs(loaded - base_logits[family]).max()),
                   'max_abs_logit': float(np.abs(peer).max())})
  for r in rows:
    r['pass'] = r['max_abs_diff'] <= TOLERANCE

  print(f'peft {peer_versions["peft"]}, transformers {peer_versions["transformers"]}, torch {peer_versions["torch"]}, '
        f'jax {jax.__version__}; float32, tokens {tokens.shape}, rank {RANK}, alpha {ALPHA}, tolerance {TOLERANCE}')
  print(f'{"direction":14s} {"model":6s} {"variant":8s} {"max |dlogit|":>13s} {"effect":>8s} {"max |logit|":>12s} pass')
  for r in rows:
    print(f'{r["direction"]:14s} {r["model"]:6s} {r["variant"]:8s} {r["max_abs_diff"]:13.2e} {r["effect"]:8.3f} '
          f'{r["max_abs_logit"]:12.2f} {r["pass"]}')
  path = write_json(result_path('peft_peer.json'),
                    {'peer': peer_versions, 'jax': jax.__version__, 'tolerance': TOLERANCE, 'rank': RANK,
                     'alpha': ALPHA, 'ours_layers': OURS, 'peft_targets': {k: v[0] for k, v in PEFT_TARGETS.items()},
                     'peer_warnings': peer_warnings, 'rows': rows}, meta=info, indent=2)
  for line in peer_warnings:
    print('peer:', line)
  print('wrote', path)
  if not all(r['pass'] for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  main()
