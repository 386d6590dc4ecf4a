"""How long training stalls when it saves a checkpoint: written in the foreground or in the background.

The trainer's compiled step of configs/llama_130m_adamw.py (float32 parameters and Adam moments: 1.6 GB of
state) on random tokens at a small CPU batch, and the trainer's `Checkpointer` writing that state to a
temporary directory every `--every` steps: with `background=False` (training waits for the files) and
`background=True` (`train.async_checkpoints`: a save waits only for the copy to host memory). Both
arms run in ONE process, alternately (the order flips every round). The stall of a save is the time
of the steps from the save up to the next save's step, minus as many plain steps (the median step
time of the same arm): what the run loses per checkpoint, background writing included, since on CPU
the writer competes with the step for the cores. Also recorded: the time the `save` call itself
blocks. Each background checkpoint is read back and must equal the state it was given (the steps
after it donate their buffers: this checks that none is overwritten while written).

  python bench/checkpoint_stall.py                       # ~10 min on 2 idle cores
  python bench/checkpoint_stall.py --size tiny --rounds 1 --out /tmp/stall.json   # a dry run

Writes bench/results/checkpoint_stall_130m.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from _common import ROOT, load_config, meta, result_path, write_json


def _arm(setup, state, tokens, background: bool, every: int, saves: int):
  """(state, plain step times, stall per save, blocking time per save) of one arm."""
  import jax
  import numpy as np

  from lowrank_jax.train.checkpoint import Checkpointer

  plain, stalls, blocking = [], [], []
  with tempfile.TemporaryDirectory(dir=os.environ.get("STALL_DIR")) as directory:
    ckpt = Checkpointer(directory, keep=2, background=background)
    for k in range(saves):
      step = int(state.step)
      expected = jax.tree.map(np.array, state.params)  # a copy, for the read-back check
      start = time.perf_counter()
      ckpt.save(state, {"processes": [], "phase": "main"}, step)
      blocking.append(time.perf_counter() - start)
      times = []
      for _ in range(every):
        t = time.perf_counter()
        state, metrics = setup.train_step(state, tokens)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
      ckpt.wait()
      stall_end = time.perf_counter()
      plain.extend(times[1:])  # the first step after a save competes with its write
      stalls.append((stall_end - start) - every * statistics.median(times[1:] or times))
      restored, _, _ = ckpt.restore(setup.abstract_state, step)
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.params), expected)
    ckpt.close()
  return state, plain, stalls, blocking


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="130m", help="LLaMA size (configs/llama_130m_adamw.py with model.size)")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--every", type=int, default=4, help="steps between saves")
  ap.add_argument("--saves", type=int, default=2, help="saves per arm and round")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  info = meta(args)

  import jax
  import numpy as np

  from lowrank_jax.train import resolve
  from lowrank_jax.train.setup import build_setup, init_state

  config = load_config(os.path.join(ROOT, "configs", "llama_130m_adamw.py"),
                       [f"model.size={args.size!r}", f"train.batch_size={args.batch}", f"data.seq_len={args.seq_len}",
                        "train.grad_accum=1", "data.source='synthetic'", "data.tokenizer=''",
                        "data.synthetic.vocab_size=32000", "optimizer.schedule='constant'"])
  run = resolve(config)
  vocab = 32002
  setup = build_setup(run, vocab)
  state = init_state(setup, vocab)
  tokens = np.random.default_rng(0).integers(2, vocab, size=(1, args.batch, args.seq_len), dtype=np.int32)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state)))
  for _ in range(2):  # compile and warm up
    state, metrics = setup.train_step(state, tokens)
    jax.block_until_ready(metrics)

  arms = {"foreground": False, "background": True}
  results = {name: {"plain_s": [], "stall_s": [], "save_call_s": []} for name in arms}
  for r in range(args.rounds):
    order = list(arms) if r % 2 == 0 else list(reversed(arms))
    for name in order:
      state, plain, stalls, blocking = _arm(setup, state, tokens, arms[name], args.every, args.saves)
      results[name]["plain_s"] += plain
      results[name]["stall_s"] += stalls
      results[name]["save_call_s"] += blocking
      print(f"round {r} {name:10s} stall {statistics.median(stalls):6.2f} s   save call "
            f"{statistics.median(blocking):6.2f} s   step {statistics.median(plain):6.2f} s", flush=True)

  summary = {name: {"median_step_s": statistics.median(v["plain_s"]), "median_stall_s": statistics.median(v["stall_s"]),
                    "median_save_call_s": statistics.median(v["save_call_s"]), **v} for name, v in results.items()}
  fg, bg = summary["foreground"], summary["background"]
  payload = {"size": args.size, "state_bytes": state_bytes, "batch": args.batch, "seq_len": args.seq_len,
             "every": args.every, "arms": summary,
             "stall_ratio_background_over_foreground": bg["median_stall_s"] / fg["median_stall_s"],
             "read_back_equal": True, "loadavg_end": list(os.getloadavg())}
  out = args.out or result_path(f"checkpoint_stall_{args.size}.json")
  write_json(out, payload, meta=info)
  print(f"\nLLaMA {args.size}, {state_bytes / 2**30:.2f} GiB of parameters and Adam state, a save every {args.every} steps")
  print(f"{'writing':12s} {'stall/save':>11s} {'save call':>10s} {'step':>8s}")
  for name, v in summary.items():
    print(f"{name:12s} {v['median_stall_s']:10.2f}s {v['median_save_call_s']:9.2f}s {v['median_step_s']:7.2f}s")
  print(f"background / foreground stall: {payload['stall_ratio_background_over_foreground']:.3f}   -> {out}")


if __name__ == "__main__":
  main()
