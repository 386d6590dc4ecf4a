"""The PyTorch peer of `bench/throughput.py`: the same LLaMA step in PyTorch + transformers.

A worker process (it imports no JAX, so it can run in another environment, e.g. a venv
with the `peers` extra: torch, transformers, galore-torch). It builds one model and
optimizer per case named on the command line, then answers lines on stdin:

  step <case>   one training step of that case -> {"case": ..., "s": seconds, "count": n}
  quit

so the caller can time it round-robin with its own steps (interleaved: load hits both
alike). The step is what the GaLore repository's `torchrun_main.py` times: forward with
labels (shifted cross-entropy over the full logits), backward, global-norm clipping, the
optimizer step, `zero_grad(set_to_none=True)`.

  <python> bench/torch_peer.py --size 60m --seq 256 --batch 8 --vocab 32101 \
      --cases adamw,galore --galore-gap 200

Cases: adamw (`torch.optim.AdamW`), galore (`galore_torch.GaLoreAdamW` on the attention
and MLP linears, as the GaLore repository). `--check` prints what is importable and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _common import T5_VOCAB  # stdlib only: this worker may run in a venv without JAX

# d_model, d_ff, heads, layers: the GaLore repository's llama_60m ... llama_1b configs.
SIZES = {
    'tiny': (128, 344, 4, 2),
    '60m': (512, 1376, 8, 8),
    '130m': (768, 2048, 12, 12),
    '350m': (1024, 2736, 16, 24),
    '1b': (2048, 5461, 32, 24),
}


def available() -> dict:
  out = {}
  for name in ('torch', 'transformers', 'galore_torch'):
    try:
      module = __import__(name)
      out[name] = getattr(module, '__version__', 'installed')
    except Exception as e:  # noqa: BLE001 (any import failure means "not available")
      out[name] = None
      out[name + '_error'] = f'{type(e).__name__}: {e}'[:200]
  return out


def build(case: str, args):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  d, ff, heads, layers = SIZES[args.size]
  torch.manual_seed(0)
  config = LlamaConfig(vocab_size=args.vocab, hidden_size=d, intermediate_size=ff, num_attention_heads=heads,
                       num_key_value_heads=heads, num_hidden_layers=layers, max_position_embeddings=args.seq,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, attn_implementation='sdpa')
  model = LlamaForCausalLM(config).to(torch.float32)
  model.train()
  if case == 'adamw':
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
  elif case == 'galore':
    from galore_torch import GaLoreAdamW

    # As the GaLore repository: attention and MLP linears projected, everything else plain AdamW.
    lowrank = [p for n, p in model.named_parameters() if p.ndim == 2 and ('self_attn' in n or 'mlp' in n)]
    ids = {id(p) for p in lowrank}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = GaLoreAdamW([{'params': rest},
                       {'params': lowrank, 'rank': args.galore_rank, 'update_proj_gap': args.galore_gap,
                        'scale': 0.25, 'proj_type': 'std'}], lr=1e-2, weight_decay=0.0)
  else:
    raise SystemExit(f'torch_peer: unknown case {case!r}; valid: adamw, galore')
  g = torch.Generator().manual_seed(1)
  tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
  return model, opt, tokens


def step(model, opt, tokens) -> None:
  import torch

  loss = model(input_ids=tokens, labels=tokens).loss
  loss.backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='60m', choices=sorted(SIZES))
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--vocab', type=int, default=T5_VOCAB)
  parser.add_argument('--cases', default='adamw,galore')
  parser.add_argument('--galore-rank', type=int, default=128)
  parser.add_argument('--galore-gap', type=int, default=200)
  parser.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: torch default)')
  parser.add_argument('--check', action='store_true')
  args = parser.parse_args(argv)
  if args.check:
    print(json.dumps(available()))
    return
  import torch

  if args.threads:
    torch.set_num_threads(args.threads)
  cases = {}
  for case in [c for c in args.cases.split(',') if c]:
    cases[case] = build(case, args)
  counts = {case: 0 for case in cases}
  print(json.dumps({'ready': sorted(cases), 'torch': torch.__version__, 'threads': torch.get_num_threads()}),
        flush=True)
  for line in sys.stdin:
    cmd = line.split()
    if not cmd or cmd[0] == 'quit':
      break
    case = cmd[1]
    t0 = time.perf_counter()
    step(*cases[case])
    dt = time.perf_counter() - t0
    print(json.dumps({'case': case, 's': dt, 'count': counts[case]}), flush=True)
    counts[case] += 1


if __name__ == '__main__':
  main()
