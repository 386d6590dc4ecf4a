"""Does it fit? Peak bytes per method and memory target, from the compiled programs.

Two tables:

* toy: the issue's toy, 8 linear layers of 2048 x 2048 (float32), batch 512, one jitted
  and donated step (gradient + update + apply). AdamW without clipping and with each
  clip mode, GaLore and OSD (rank 256, split refresh: the every-step program and the
  refresh program are compiled separately). Figure: arguments + temporaries, and the
  ratio to AdamW's.
* models: LLaMA 1b / 7b through the trainer's own memory report (`train.py
  --memory_report`), every program the run executes: AdamW, GaLore, OSD, LoRA;
  bfloat16 weights (and states), remat per block, one micro-batch of 16 x 256 tokens
  (the GaLore paper's 7B single-device setting), `optimizer.clip_mode=previous` so no
  method is charged for global-norm clipping's full gradient; with 8-bit optimizer states
  too when the trainer has `optimizer.state_bits`. `--nonfinite_guard step|loss` measures the runs
  with that `train.nonfinite_guard` (`step` makes every update wait for the global gradient norm,
  so the step holds one full set of gradients at the end of the backward pass; `loss` is the default).
  `--loss_chunk_positions N` measures them with `train.loss_chunk_positions=N` (the output head and
  the cross-entropy over N positions at a time: no [tokens, vocab] logits); `--no_8bit` leaves out
  the 7b 8-bit-state row.

* configs: the shipped configs as a user runs them (issue #25's table): the 7B configs on tpu-v5e
  (GaLore with bf16 weights on tpu-v5p), and the 1b GaLore / AdamW configs with remat per block and
  micro-batch 16. `CONFIG_CASES` lists each case's config and the overrides it adds.
* int8: the toy's 16 layers of 2048 x 2048 bf16 under Adam, remat per layer, on one target: bf16
  weights against int8 weights with one scale per output column and with blocks of 256 rows
  (`model.weight_block`).

Targets: cpu (XLA:CPU on this host: no remat, bf16 held as f32), tpu-v5e / tpu-v5p /
tpu-v6e (compiled ahead of time on this host; `pip install -e ".[aot]"`), gpu (on a
machine with a GPU: the compiled analysis plus the allocator's peak after one real step).
Each case runs in its own process (a fresh allocator peak on the GPU, and a crash or an
out-of-memory case does not stop the table); results are written as they come.

  python bench/memory_fit.py --targets cpu,tpu-v5e --sections toy
  python bench/memory_fit.py --targets tpu-v5e,tpu-v5p --sections 1b,7b
  python bench/memory_fit.py --sections configs,int8 --out bench/results/memory_fit_configs.json
  python bench/memory_fit.py --target gpu --sections 1b --out_dir /tmp/out   # on a GPU machine, ~3 min
  python bench/memory_fit.py --target gpu --sections 1b --dry_run            # the same path, tiny, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from _common import RESULTS, ROOT, config_module, offline_data, meta, set_dotted, write_json

MiB, GiB = 2**20, 2**30

# --- toy ---------------------------------------------------------------------------------

TOY_CASES = ("adamw", "adamw+global", "adamw+block", "adamw+previous", "galore", "osd")


def toy_case(target_name: str, case: str, only: list[str] | None = None) -> list[dict]:
  """Rows for one toy case on one target: the step program (and the refresh program for GaLore/OSD)."""
  from lowrank_jax.train import targets

  targets.prepare_environment(target_name)
  import jax
  import jax.numpy as jnp
  import optax

  from lowrank_jax import optim

  target = targets.get_target(target_name)
  sharding = jax.sharding.SingleDeviceSharding(target.devices(1)[0])
  layers, width, batch = 8, 2048, 512
  params = [jax.ShapeDtypeStruct((width, width), jnp.float32, sharding=sharding) for _ in range(layers)]
  x = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=sharding)
  everything = [True] * layers

  def loss(ps, x):
    for w in ps:
      x = jnp.tanh(x @ w)
    return jnp.mean(jnp.square(x))

  adamw = optax.adamw(1e-3)
  tx = {
      "adamw": adamw,
      "adamw+global": optax.chain(optim.clip_gradients(mode="global", threshold=1.0), adamw),
      "adamw+block": optax.chain(optim.clip_gradients(mode="block", threshold=1e-3), adamw),
      "adamw+previous": optax.chain(optim.clip_gradients(mode="previous", threshold=1.0), adamw),
      "galore": optim.galore(learning_rate=1e-3, rank=256, projection_mask=everything, split_refresh=True),
      "osd": optim.osd(learning_rate=1e-3, rank=256, projection_mask=everything, split_refresh=True),
  }[case]
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                       jax.eval_shape(tx.init, params))

  def step(ps, st, x):
    updates, st = tx.update(jax.grad(loss)(ps, x), st, ps)
    return optax.apply_updates(ps, updates), st

  def refresh(ps, st, x):
    return optim.refresh_projectors(tx, jax.grad(loss)(ps, x), st, ps)

  programs = {"step": jax.jit(step, donate_argnums=(0, 1))}
  if case in ("galore", "osd"):
    programs["refresh"] = jax.jit(refresh, donate_argnums=(1,))
  programs = {k: v for k, v in programs.items() if not only or k in only}
  rows = []
  for program, fn in programs.items():
    start = time.time()
    m = targets.compile_memory(fn.lower(params, state, x), target)
    rows.append({"section": "toy", "target": target_name, "method": case, "program": program,
                 "args_plus_temp_bytes": m.argument_bytes + m.temp_bytes, "temp_bytes": m.temp_bytes,
                 "peak_bytes": m.peak_bytes, "fits": m.fits, "layer_gradient_bytes": width * width * 4,
                 "compile_s": round(time.time() - start, 1)})
  return rows


# --- models ------------------------------------------------------------------------------

MODEL_METHODS = ("adamw", "galore", "osd", "lora")
RANKS = {"1b": 512, "7b": 1024}




def model_config(size: str, method: str, *, state_bits: int | None = None, tiny: bool = False,
                 nonfinite_guard: str | None = None, loss_chunk_positions: int | None = None):
  """The run measured for (size, method): the method's 130m C4 config at this size, bf16, remat."""
  config = config_module(f"llama_130m_{method}").get_config()
  config.model.size = "tiny" if tiny else size
  config.model.dtype = config.model.param_dtype = "bfloat16"
  config.model.remat = "block"
  config.data.seq_len = 256
  config.train.batch_size, config.train.grad_accum = 16, 1
  config.optimizer.clip_mode = "previous"
  offline_data(config)
  rank = 16 if tiny else RANKS[size]
  if method in ("galore", "osd"):
    config.optimizer[method].rank = rank
    config.optimizer[method].projector_dtype = "bfloat16"  # projectors and low-rank moments in bf16 too
  if method == "lora":
    config.optimizer.lora.rank = 16 if tiny else RANKS[size] // 4  # LoRA's usual rank, below GaLore's
  if state_bits:
    config.optimizer.state_bits = state_bits
  if nonfinite_guard:
    if "nonfinite_guard" not in config.train:
      raise SystemExit("--nonfinite_guard: this trainer has no train.nonfinite_guard setting")
    config.train.nonfinite_guard = nonfinite_guard
  if loss_chunk_positions is not None:
    config.train.loss_chunk_positions = loss_chunk_positions
  return config


def model_case(target_name: str, size: str, method: str, state_bits: int | None, tiny: bool,
               only: list[str] | None, nonfinite_guard: str | None = None,
               loss_chunk_positions: int | None = None) -> list[dict]:
  from lowrank_jax.train import memory_report

  start = time.time()
  config = model_config(size, method, state_bits=state_bits, tiny=tiny, nonfinite_guard=nonfinite_guard,
                        loss_chunk_positions=loss_chunk_positions)
  report = memory_report(config, target_name,
                         only=tuple(only) if only else None)
  row = {"section": size, "target": target_name, "method": method + (f" {state_bits}-bit" if state_bits else ""),
         "program": "+".join(report["programs"]), "compile_s": round(time.time() - start, 1),
         "rank": None if method == "adamw" else (RANKS[size] // 4 if method == "lora" else RANKS[size]),
         "nonfinite_guard": config.train.get("nonfinite_guard", "step"),
         "loss_chunk_positions": config.train.get("loss_chunk_positions", 0)}
  row.update({k: report[k] for k in ("params_bytes", "opt_state_bytes", "argument_bytes", "temp_bytes", "peak_bytes",
                                     "capacity_bytes", "fits")})
  row["programs"] = {name: p["peak_bytes"] for name, p in report["programs"].items()}
  if "measured_peak_bytes" in report:
    row["measured_peak_bytes"] = report["measured_peak_bytes"]
  return [row]


def has_state_bits() -> bool:
  from lowrank_jax.train.config import default_config

  return "state_bits" in default_config().optimizer


# --- configs: the shipped configs, as users run them ------------------------------------------

# (config, target, overrides): issue #25's rows.
CONFIG_CASES = (
    ("llama_7b_apollo_mini", "tpu-v5e", {}),
    ("llama_7b_galore", "tpu-v5e", {}),
    ("llama_7b_galore", "tpu-v5p", {}),  # where it fits: the peak it needs, not the failed compile's figure
    ("llama_7b_galore", "tpu-v5p", {"model.weight_bits": 16}),
    ("llama_7b_adamw", "tpu-v5e", {}),
    ("llama_1b_galore", "tpu-v5e", {"model.remat": "block", "train.batch_size": 16, "train.grad_accum": 1}),
    ("llama_1b_adamw", "tpu-v5e", {"model.remat": "block", "train.batch_size": 16, "train.grad_accum": 1}),
)


def config_case(spec: dict) -> list[dict]:
  from lowrank_jax.train import memory_report

  start = time.time()
  config = config_module(spec["config"]).get_config()
  for key, value in spec["overrides"].items():
    set_dotted(config, key, value)
  offline_data(config)
  report = memory_report(config, spec["target"], only=tuple(spec["programs"]) if spec.get("programs") else None)
  row = {"section": "configs", "target": spec["target"], "config": spec["config"], "overrides": spec["overrides"],
         "method": config.optimizer.name, "weight_bits": config.model.weight_bits,
         "state_bits": config.optimizer.state_bits, "compile_s": round(time.time() - start, 1)}
  row.update({k: report[k] for k in ("params_bytes", "opt_state_bytes", "argument_bytes", "temp_bytes", "peak_bytes",
                                     "capacity_bytes", "fits")})
  row["programs"] = {name: p["peak_bytes"] for name, p in report["programs"].items()}
  return [row]


# --- int8: bf16 weights against int8 weights (per column, blocks of 256 rows), on the toy -------

INT8_CASES = ("bf16", "int8 per column", "int8 block 256")


def int8_case(target_name: str, case: str, layers: int = 16, width: int = 2048, batch: int = 2048) -> list[dict]:
  from lowrank_jax.train import targets

  targets.prepare_environment(target_name)
  import jax
  import jax.numpy as jnp
  import optax

  from lowrank_jax.nn import int8_weight

  target = targets.get_target(target_name)
  sharding = jax.sharding.SingleDeviceSharding(target.devices(1)[0])
  place = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), t)  # noqa: E731
  floats = [jnp.zeros((width, width), jnp.bfloat16) for _ in range(layers)]
  block = {"bf16": 0, "int8 per column": None, "int8 block 256": 256}[case]
  params = place(jax.eval_shape(lambda: floats if block == 0 else [int8_weight.quantize(w, block) for w in floats]))
  x = jax.ShapeDtypeStruct((batch, width), jnp.bfloat16, sharding=sharding)
  tx = optax.adam(1e-3)
  state = place(jax.eval_shape(lambda p: tx.init(int8_weight.float_view(p)), params))

  def loss(ws, x):
    for w in ws:
      x = jax.checkpoint(lambda x, w: jnp.tanh(x @ w[...]).astype(jnp.bfloat16))(x, w)
    return jnp.mean(jnp.square(x.astype(jnp.float32)))

  def step(ws, st, x):
    _, grads = int8_weight.value_and_grad(loss)(ws, x)
    updates, st = tx.update(grads, st, int8_weight.float_view(ws))
    return int8_weight.apply_updates(ws, updates, jnp.uint32(0)), st

  start = time.time()
  m = targets.compile_memory(jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x), target)
  return [{"section": "int8", "target": target_name, "method": case, "layers": layers, "width": width,
           "argument_bytes": m.argument_bytes, "temp_bytes": m.temp_bytes, "peak_bytes": m.peak_bytes,
           "compile_s": round(time.time() - start, 1)}]


# --- driver --------------------------------------------------------------------------------

def run_case(spec: dict, timeout: float | None) -> list[dict]:
  """One case in a fresh process; a failure becomes a row saying so."""
  cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps(spec)]
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
  except subprocess.TimeoutExpired:
    return [{**spec, "error": f"timed out after {timeout:.0f} s"}]
  for line in reversed(out.stdout.splitlines()):
    if line.startswith("ROWS "):
      return json.loads(line[5:])
  tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
  return [{**spec, "error": " | ".join(tail)[-400:]}]


def one(spec: dict) -> None:
  if spec["section"] == "toy":
    rows = toy_case(spec["target"], spec["method"], spec.get("programs"))
  elif spec["section"] == "configs":
    rows = config_case(spec)
  elif spec["section"] == "int8":
    rows = int8_case(spec["target"], spec["method"])
  else:
    rows = model_case(spec["target"], spec["section"], spec["method"], spec.get("state_bits"), spec.get("tiny", False),
                      spec.get("programs"), spec.get("nonfinite_guard"), spec.get("loss_chunk_positions"))
  print("ROWS " + json.dumps(rows), flush=True)


def specs_for(targets_: list[str], sections: list[str], tiny: bool, programs: list[str] | None,
              methods: list[str], nonfinite_guard: str | None = None, loss_chunk_positions: int | None = None,
              with_8bit: bool = True) -> list[dict]:
  specs = []
  for target in targets_:
    for section in sections:
      if section == "toy":
        specs += [{"section": "toy", "target": target, "method": m, "programs": programs} for m in TOY_CASES]
        continue
      if section in ("configs", "int8"):
        continue  # (their own targets: see specs_for's caller)
      common = {"section": section, "target": target, "programs": programs, "nonfinite_guard": nonfinite_guard,
                "loss_chunk_positions": loss_chunk_positions}
      specs += [{**common, "method": m, "tiny": tiny} for m in methods]
      if section == "7b" and not tiny and "galore" in methods and with_8bit and has_state_bits():
        specs.append({**common, "method": "galore", "state_bits": 8})
  return specs


def _gib(x):
  return f"{x / GiB:7.2f}" if isinstance(x, (int, float)) else "      -"


def print_config_table(rows: list[dict]) -> None:
  """The shipped configs' table: GiB per device, fits, and the 1b GaLore / AdamW ratio."""
  print("\nshipped configs (issue #25); GiB per device, every program the run executes")
  print(f"{'config':<22} {'target':<8} {'overrides':<44} {'weights':>7} {'states':>7} {'peak':>7} {'capacity':>8} fits")
  for r in rows:
    over = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "-"
    if "error" in r:
      print(f"{r['config']:<22} {r['target']:<8} {over:<44} error: {r['error']}")
      continue
    print(f"{r['config']:<22} {r['target']:<8} {over:<44} {_gib(r['params_bytes'])} {_gib(r['opt_state_bytes'])} "
          f"{_gib(r['peak_bytes'])} {_gib(r['capacity_bytes'])} {r['fits']}")
  peak = {r["config"]: r["peak_bytes"] for r in rows if "error" not in r and r["target"] == "tpu-v5e"}
  if "llama_1b_galore" in peak and "llama_1b_adamw" in peak:
    print(f"1b GaLore / AdamW on tpu-v5e: {peak['llama_1b_galore'] / peak['llama_1b_adamw']:.3f}")


def print_int8_table(rows: list[dict]) -> None:
  print("\nint8 weights, toy (16 x 2048 x 2048, Adam, remat per layer), MiB")
  print(f"{'target':<8} {'weights':<16} {'args':>8} {'temp':>8} {'peak':>8}")
  for r in rows:
    if "error" in r:
      print(f"{r['target']:<8} {r['method']:<16} error: {r['error']}")
      continue
    print(f"{r['target']:<8} {r['method']:<16} {r['argument_bytes'] / MiB:8.1f} {r['temp_bytes'] / MiB:8.1f} "
          f"{r['peak_bytes'] / MiB:8.1f}")


def print_tables(rows: list[dict]) -> None:
  if [r for r in rows if r["section"] == "configs"]:
    print_config_table([r for r in rows if r["section"] == "configs"])
  if [r for r in rows if r["section"] == "int8"]:
    print_int8_table([r for r in rows if r["section"] == "int8"])
  rows = [r for r in rows if r["section"] not in ("configs", "int8")]
  toy = [r for r in rows if r["section"] == "toy"]
  if toy:
    print("\ntoy: 8 x (2048 x 2048) f32, batch 512; arguments + temporaries (MiB), ratio to AdamW (no clip)")
    print(f"{'target':<9} {'method':<16} {'program':<8} {'args+temp':>10} {'temp':>8} {'x AdamW':>8} {'peak':>8}")
    for r in toy:
      if "error" in r:
        print(f"{r['target']:<9} {r['method']:<16} error: {r['error']}")
        continue
      base = next((b for b in toy if b["target"] == r["target"] and b["method"] == "adamw" and "error" not in b), None)
      ratio = r["args_plus_temp_bytes"] / base["args_plus_temp_bytes"] if base else float("nan")
      print(f"{r['target']:<9} {r['method']:<16} {r['program']:<8} {r['args_plus_temp_bytes'] / MiB:10.1f} "
            f"{r['temp_bytes'] / MiB:8.1f} {ratio:8.3f} {r['peak_bytes'] / MiB:8.1f}")
  models = [r for r in rows if r["section"] != "toy"]
  if models:
    print("\nLLaMA, bf16 weights and states, remat per block, micro-batch 16 x 256, clip_mode previous; GiB per device")
    print("(guard: train.nonfinite_guard; 'step' holds every gradient until the global norm is known;"
          " chunk: train.loss_chunk_positions, 0 = full logits)")
    print(f"{'size':<4} {'target':<8} {'method':<13} {'guard':<5} {'chunk':>5} {'params':>7} {'states':>7} {'temp':>7} "
          f"{'peak':>7} {'x AdamW':>7} {'capacity':>8} {'fits':>5} {'measured':>8}")
    for r in models:
      if "error" in r:
        print(f"{r['section']:<4} {r['target']:<8} {r['method']:<13} error: {r['error']}")
        continue
      base = next((b for b in models if b["target"] == r["target"] and b["section"] == r["section"]
                   and b["method"] == "adamw" and "error" not in b
                   and b.get("nonfinite_guard", "step") == r.get("nonfinite_guard", "step")
                   and b.get("loss_chunk_positions", 0) == r.get("loss_chunk_positions", 0)), None)
      ratio = f"{r['peak_bytes'] / base['peak_bytes']:7.3f}" if base else "      -"
      print(f"{r['section']:<4} {r['target']:<8} {r['method']:<13} {r.get('nonfinite_guard', 'step'):<5} "
            f"{r.get('loss_chunk_positions', 0):>5} "
            f"{_gib(r['params_bytes'])} "
            f"{_gib(r['opt_state_bytes'])} {_gib(r['temp_bytes'])} {_gib(r['peak_bytes'])} {ratio} "
            f"{_gib(r['capacity_bytes'])} {str(r['fits']):>5} {_gib(r.get('measured_peak_bytes'))}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--targets", "--target", default="tpu-v5e,tpu-v5p",
                      help="comma-separated: cpu, tpu-v5e, tpu-v5p, tpu-v6e, gpu")
  parser.add_argument("--sections", default="toy,1b,7b", help="comma-separated: toy, 1b, 7b")
  parser.add_argument("--out", default=os.path.join(RESULTS, "memory_fit.json"))
  parser.add_argument("--out_dir", default=None, help="write memory_fit_<targets>.json here instead of --out")
  parser.add_argument("--timeout", type=float, default=None, help="seconds per case (default: none)")
  parser.add_argument("--dry_run", action="store_true",
                      help="tiny models on the CPU through the same code path (checks the script, not the figures)")
  parser.add_argument("--methods", default=",".join(MODEL_METHODS), help="model table methods")
  parser.add_argument("--programs", default=None,
                      help="model table: only these programs (e.g. 'step': a refresh program's SVD compiles for many "
                      "minutes on the TPU targets); default: every program the run executes")
  parser.add_argument("--nonfinite_guard", default=None, choices=("step", "loss"),
                      help="model table: train.nonfinite_guard of the runs (default: the trainer's, loss)")
  parser.add_argument("--loss_chunk_positions", type=int, default=None,
                      help="model table: train.loss_chunk_positions of the runs (default: the trainer's, 0: full "
                      "logits)")
  parser.add_argument("--no_8bit", action="store_true", help="model table: leave out the 7b 8-bit-state row")
  parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    one(json.loads(args.one))
    return
  targets_ = [t.strip() for t in args.targets.split(",") if t.strip()]
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  if args.dry_run:
    targets_ = ["cpu"]
  out = os.path.join(args.out_dir, f"memory_fit_{'_'.join(targets_)}.json") if args.out_dir else args.out
  if args.dry_run and not args.out_dir:
    out = os.path.join("/tmp", "memory_fit_dry_run.json")
  info = meta(args)
  rows: list[dict] = []
  start = time.time()
  programs = [p.strip() for p in args.programs.split(",")] if args.programs else None
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  specs = specs_for(targets_, sections, tiny=args.dry_run, programs=programs, methods=methods,
                    nonfinite_guard=args.nonfinite_guard, loss_chunk_positions=args.loss_chunk_positions,
                    with_8bit=not args.no_8bit)
  if "int8" in sections:
    specs += [{"section": "int8", "target": "tpu-v5e", "method": m} for m in INT8_CASES]
  if "configs" in sections:
    specs += [{"section": "configs", "target": t, "config": c, "overrides": o, "programs": programs}
              for c, t, o in CONFIG_CASES]
  for spec in specs:
    if spec["section"] == "toy" and args.dry_run:
      continue  # the toy is already small; nothing to dry-run
    rows += run_case(spec, args.timeout)
    print(f"[{time.time() - start:6.0f} s] {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    write_json(out, {"rows": rows, "complete": False}, meta=info)
  write_json(out, {"rows": rows, "complete": True, "seconds": round(time.time() - start)}, meta=info)
  print_tables(rows)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
