#!/usr/bin/env bash
# One prepared GPU run (about 7.5 minutes): the throughput set of #19, the memory table of #11,
# and the quality protocol (#15) with whatever time is left.
#
#   OUT=/some/empty/dir bash bench/gpu_session.sh           # on the GPU machine, from the repo root
#   OUT=/tmp/out DRY_RUN=1 bash bench/gpu_session.sh        # the same steps at toy sizes, on CPU
#
# Packages the GPU machine lacks travel as wheels in .whl/ (ignored by git: pass it with the
# working tree); they go to /tmp/site, and the package is used from the tree through PYTHONPATH
# (never pip-installed with its dependencies). Every part runs under its own `timeout`, so one
# failing or hanging part costs only its own time. Results, all under $OUT:
#   gpu_session.log        everything printed, with timings per part
#   env.json               versions, device, nvidia-smi
#   throughput_gpu.json    #19: tokens/s, step time, MFU, memory per case (bench/throughput.py)
#   throughput_cases.log   the cases' own output
#   memory_fit_gpu.json    #11: the 1b memory table (bench/memory_fit.py, engineer D)
#   memory_gpu.json        #11: device memory peaks of the throughput cases
#   quality_full.json      #15: bench/quality.py --full (only when its data is present)
# Budgets (seconds, environment): GPU_TOTAL_S (450), A_S throughput (240), B_S memory (150);
# THROUGHPUT_ARGS: extra bench/throughput.py flags (e.g. --variants adamw,galore).
# LOWRANK_COMMIT: the commit the tree is at, for the results' meta when the copy carries no .git
# (bench/_common.py's meta() reads git first), e.g. LOWRANK_COMMIT=$(git rev-parse HEAD) from the checkout.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -u
: "${OUT:?set OUT to an empty output folder}"
cd "$(dirname "$0")/.."
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
START=$(date +%s)
TOTAL=${GPU_TOTAL_S:-450}
DRY=${DRY_RUN:-0}
left() { echo $((TOTAL - ($(date +%s) - START))); }
part() { echo "=== $(date +%T) +$(($(date +%s) - START))s: $*"; }
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)

part "environment"
python3 - "$OUT/env.json" <<'EOF' || echo "environment probe failed"
import json, os, subprocess, sys
info = {'python': sys.version, 'cpu_count': os.cpu_count(), 'PYTHONPATH': os.environ.get('PYTHONPATH')}
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections', 'grain', 'numpy'):
  try:
    module = __import__(name, fromlist=['_'])
    info[name] = getattr(module, '__version__', 'installed')
  except Exception as e:
    info[name] = f'MISSING: {e}'
try:
  import jax
  info['devices'] = [f'{d.platform}:{d.device_kind}' for d in jax.devices()]
  info['backend'] = jax.default_backend()
except Exception as e:
  info['devices'] = f'ERROR: {e}'
try:
  info['nvidia_smi'] = subprocess.run(['nvidia-smi', '--query-gpu=name,memory.total,clocks.max.sm,power.limit',
                                       '--format=csv'], capture_output=True, text=True, timeout=20).stdout
except Exception as e:
  info['nvidia_smi'] = f'unavailable: {e}'
try:
  import lowrank_jax.train  # noqa: F401  (the whole package imports: no dependency is missing)
  from lowrank_jax.train.methods import method_names
  info['methods'] = method_names()
except Exception as e:
  info['lowrank_jax'] = f'IMPORT FAILED: {type(e).__name__}: {e}'
json.dump(info, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(info, indent=1))
EOF

# a. #19 throughput: LLaMA-1b bf16 AdamW (MFU), GaLore, OSD, float32, LoRA, APOLLO... one process each.
A=${A_S:-240}
part "a. throughput (budget ${A}s)"
timeout -k 10 $((A + 20)) python3 bench/throughput.py --target gpu --budget "$A" --case-timeout 110 \
  --out "$OUT/throughput_gpu.json" --log "$OUT/throughput_cases.log" "${DRYFLAG[@]}" ${THROUGHPUT_ARGS:-} \
  || echo "throughput exited with $?"

# b. #11 memory table at LLaMA-1b (AdamW, GaLore, OSD, LoRA; engineer D's bench/memory_fit.py: each case
# compiles the step and refresh programs for this GPU and runs one real step: allocator peak + analysis).
# memory_gpu.json also collects the peaks the throughput cases measured (memory_stats after real steps).
B=${B_S:-150}
B=$(( $(left) - 40 < B ? $(left) - 40 : B ))
part "b. memory table (budget ${B}s)"
if [ -f bench/memory_fit.py ] && [ "$B" -gt 40 ]; then
  MF=(--target gpu --sections 1b --out_dir "$OUT" --timeout $(( B / 2 < 75 ? B / 2 : 75 )))
  [ "$DRY" = 1 ] && MF=(--target gpu --sections 1b --dry_run --out_dir "$OUT" --timeout 60)
  timeout -k 10 "$B" python3 bench/memory_fit.py "${MF[@]}" || echo "memory_fit exited with $?"
fi
python3 - "$OUT/throughput_gpu.json" "$OUT/memory_gpu.json" <<'EOF' || echo "memory table from throughput failed"
import json, sys
src = json.load(open(sys.argv[1]))
rows = [{k: r.get(k) for k in ('case', 'method', 'size', 'dtype', 'batch', 'seq', 'memory_stats_peak_bytes',
                               'memory_stats_in_use_bytes', 'memory_analysis')}
        for r in src.get('cases', []) if 'memory_stats_peak_bytes' in r]
json.dump({'source': 'bench/throughput.py GPU cases: device memory_stats() peak after real steps, per process',
           'meta': src['meta'], 'device': src['meta']['device'].get('kind'), 'rows': rows},
          open(sys.argv[2], 'w'), indent=1)
for r in rows:
  peak = r['memory_stats_peak_bytes']
  print(f"{r['case']:<24} peak {peak / 2**30:8.2f} GiB" if peak else f"{r['case']:<24} peak -")
EOF

# c. quality (#15) with what is left, only when bench/quality.py has a GPU budget flag and its data.
C=$(( $(left) - 15 ))
part "c. quality (budget ${C}s)"
if [ "$DRY" != 1 ] && [ "$C" -gt 60 ] && [ -f bench/quality.py ] \
   && python3 bench/quality.py --help 2>/dev/null | grep -q -- "--budget_s" \
   && [ -d ../shared/data/c4 ]; then
  timeout -k 10 "$C" python3 bench/quality.py --full --budget_s $((C - 20)) --out "$OUT" --name quality_full \
    || echo "quality exited with $?"
else
  echo "quality skipped (dry run, no time left, no --budget_s flag, or no C4 sample at ../shared/data)"
fi
part "done"
