#!/usr/bin/env bash
# The one prepared GPU run of #31 (about 8.5 minutes of a lent GPU; every part under its own `timeout`,
# so one failing or hanging part costs only its own time):
#   a. environment   versions, device, nvidia-smi, whether the tree's packages import     -> env.json
#   b. memory target `train.py --config configs/llama_1b_adamw.py --memory_report --memory_target=gpu`
#                    (model.attention=auto): the compiled analysis beside the allocator's peak after one
#                    real step, the whole command timed                 -> memory_target_gpu.{log,json}
#   c. throughput    `bench/throughput.py --target gpu`: 1b bf16 AdamW (MFU), GaLore, APOLLO-Mini, LoRA
#                    with fused (auto = cuDNN) and XLA attention, without and with remat per block, a
#                    micro-batch search for AdamW, and 7b GaLore rank 1024 with 8-bit states and the lean
#                    config (allocator peak, tokens/s), in priority order until its budget is spent
#                    (bench/throughput.py's GPU_ORDER)          -> throughput_gpu.json, throughput_cases.log
#   d. correctness   the device-independent test suite on the GPU, `python -m pytest -x -q` under a time cap
#                    (SIGINT at the cap: pytest still prints what passed); the files that need N host CPU
#                    devices are left out                                           -> pytest_gpu.log
#   e. memory table  bench/memory_fit.py --target gpu --sections 1b, only with time left -> memory_fit_gpu.json
# Everything printed, with each part's time and exit status, goes to gpu_session.log: at most 8 files in
# all come back from $OUT.
#
#   OUT=/some/empty/dir bash bench/gpu_session.sh           # on the GPU machine, from the repo root
#   OUT=/tmp/out DRY_RUN=1 bash bench/gpu_session.sh        # every part at toy sizes on the CPU (~6 min)
#   bash bench/gpu_session.sh wheels                        # here, with a network: the wheels below into .whl/
#
# Packages the GPU image lacks (ml_collections, grain and grain's array_record, portpicker) travel as
# wheels in .whl/ (ignored: name it in the run's `carry`); they go to /tmp/site, and the package is
# used from the tree through PYTHONPATH (never pip-installed with its dependencies).
# Budgets (seconds, environment): GPU_TOTAL_S (510: the whole run), MEM_S b (100), TP_S c (260),
# PYTEST_S d (120); e gets what is left when that is at least 90. Each part gets at most what is left
# after the later parts' budgets. THROUGHPUT_ARGS: extra bench/throughput.py flags (e.g. --variants
# adamw,galore or --groups F); PYTEST_ARGS replaces "-x -q -p no:cacheprovider -n 8".
# JAX_COMPILATION_CACHE_DIR (a fresh folder under /tmp unless set) is shared by b and c, which also
# shares XLA's per-fusion autotuning results between their processes (the same 1b matrix shapes).
# LOWRANK_COMMIT: the commit the tree is at, for the results' meta when the copy carries no .git
# (bench/_common.py's meta() reads git first), e.g. LOWRANK_COMMIT=$(git rev-parse HEAD) from the checkout.
set -u
cd "$(dirname "$0")/.."
WHEELS=("ml_collections==1.1.0" "grain==0.2.18" "array_record==0.8.6" "portpicker==1.6.0")
if [ "${1:-}" = wheels ]; then
  WHEEL_DIR=${WHEEL_DIR:-.whl}
  [ "$WHEEL_DIR" = .whl ] && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEEL_DIR" "${WHEELS[@]}"
fi
: "${OUT:?set OUT to an empty output folder}"
DRY=${DRY_RUN:-0}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_session.log") 2>&1
START=$(date +%s)
left() { echo $((TOTAL - ($(date +%s) - START))); }
part() { PART_START=$(date +%s); echo "=== $(date +%T) +$((PART_START - START))s: $*"; }
SUMMARY=()
done_part() {  # name, exit status
  local took=$(( $(date +%s) - PART_START ))
  echo "=== $1: exit $2 after ${took}s"
  SUMMARY+=("$(printf '%-16s exit %-4s %5ss' "$1" "$2" "$took")")
}
cap() {  # the smaller of $1 and what is left after reserving $2 seconds for the later parts
  local l=$(( $(left) - $2 ))
  echo $(( $1 < l ? $1 : l ))
}

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export JAX_PLATFORMS=cpu PYTHONPATH=$PWD
  TOTAL=${GPU_TOTAL_S:-600}; MEM_S=${MEM_S:-90}; TP_S=${TP_S:-330}; PYTEST_S=${PYTEST_S:-90}
else
  PY=${PYTHON:-python3}
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || echo "installing .whl/ failed"
  fi
  export PYTHONPATH=/tmp/site:$PWD
  TOTAL=${GPU_TOTAL_S:-510}; MEM_S=${MEM_S:-100}; TP_S=${TP_S:-260}; PYTEST_S=${PYTEST_S:-120}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
CACHE=${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d /tmp/jax_cache_gpu_session.XXXXXX)}
echo "dry run: $DRY; python: $PY; budget ${TOTAL}s (b ${MEM_S}, c ${TP_S}, d ${PYTEST_S}); compile cache $CACHE"

part "a. environment"
timeout -k 5 90 "$PY" - "$OUT/env.json" <<'EOF'
import json, os, subprocess, sys
info = {'python': sys.version, 'executable': sys.executable, 'cpu_count': os.cpu_count(),
        'PYTHONPATH': os.environ.get('PYTHONPATH')}
for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax.checkpoint', 'chex', 'ml_collections', 'grain', 'numpy',
             'sentencepiece', 'pytest', 'xdist', 'datasets', 'safetensors'):
  try:
    module = __import__(name, fromlist=['_'])
    info[name] = getattr(module, '__version__', 'installed')
  except Exception as e:
    info[name] = f'MISSING: {e}'
try:
  import jax
  devices = jax.devices()
  info['devices'] = [f'{d.platform}:{d.device_kind}' for d in devices]
  info['backend'] = jax.default_backend()
  info['memory_stats'] = devices[0].memory_stats()
except Exception as e:
  info['devices'] = f'ERROR: {e}'
try:
  query = '--query-gpu=name,memory.total,memory.used,clocks.max.sm,power.limit'
  info['nvidia_smi'] = subprocess.run(['nvidia-smi', query, '--format=csv'], capture_output=True, text=True,
                                      timeout=20).stdout
except Exception as e:
  info['nvidia_smi'] = f'unavailable: {e}'
try:
  import lowrank_jax.train  # noqa: F401  (the whole package imports: no dependency is missing)
  from lowrank_jax.train.methods import method_names
  from configs import base
  info['methods'] = method_names()
  info['model.attention'] = base.get_config().model.get('attention', 'ABSENT (no model.attention setting)')
except Exception as e:
  info['lowrank_jax'] = f'IMPORT FAILED: {type(e).__name__}: {e}'
json.dump(info, open(sys.argv[1], 'w'), indent=1, default=str)
print(json.dumps(info, indent=1, default=str))
EOF
done_part "a. environment" $?
ATTN=()
grep -q '"model.attention": "ABSENT' "$OUT/env.json" 2>/dev/null || ATTN=(--config.model.attention=auto)

# b. The GPU memory report of the 1b AdamW config, offline (the shipped C4 sample and T5 tokenizer in
# place of the Hub ids; the report reads no data), compiled once, then one real step.
memory_target() {
  S=lowrank_jax/data/sample_data
  MT=(train.py --config "${MT_CONFIG:-configs/llama_1b_adamw.py}" --memory_report --memory_target=gpu
      --config.data.source=jsonl --config.data.path=$S/c4/train.jsonl
      --config.data.tokenizer=$S/tokenizers/c4_t5_32k.model
      "${ATTN[@]}")
  [ "$DRY" = 1 ] && MT=("${MT[@]/--memory_target=gpu/--memory_target=cpu}" --config.model.size=tiny)
  echo "$PY ${MT[*]}"
  T0=$(date +%s%N)
  JAX_COMPILATION_CACHE_DIR=$CACHE timeout -k 10 "$B" "$PY" "${MT[@]}" > "$OUT/memory_target_gpu.log" 2>&1
  RC=$?
  WALL_MS=$(( ($(date +%s%N) - T0) / 1000000 ))
  tail -n 25 "$OUT/memory_target_gpu.log"
  "$PY" - "$OUT/memory_target_gpu.log" "$OUT/memory_target_gpu.json" "$RC" "$WALL_MS" "${MT[*]}" <<'EOF' \
  || echo "memory target summary failed"
import json, re, sys
log, out, rc, wall, command = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) / 1e3, sys.argv[5]
text = open(log, errors='replace').read()
lines = text.splitlines()
report = None
for line in reversed(lines):
  if line.startswith('{'):
    try:
      report = json.loads(line)
      break
    except ValueError:
      pass
measured = re.search(r'measured peak\s+[\d,.]+ MiB\s+([\d,]+) B', text)
measured = int(measured.group(1).replace(',', '')) if measured else (report or {}).get('measured_peak_bytes')
compiled = (report or {}).get('peak_bytes')
row = {'command': command, 'exit': rc, 'timed_out': rc in (124, 137), 'wall_s': round(wall, 1), 'report': report,
       'compiled_peak_bytes': compiled, 'measured_peak_bytes': measured,
       'compiled_over_measured': compiled / measured if compiled and measured else None,
       'compile_lines': [l.strip() for l in lines if re.search(r'compil', l, re.I)][-20:],
       'last_lines': lines[-5:]}
json.dump(row, open(out, 'w'), indent=1)
ratio = f"{row['compiled_over_measured']:.3f}" if row['compiled_over_measured'] else '-'
gib = lambda b: f'{b / 2**30:.2f} GiB' if b else '-'
print(f"memory target: exit {rc} after {wall:.0f} s; compiled peak {gib(compiled)}, measured {gib(measured)}, "
      f"compiled / measured {ratio} (goal: within 5%)")
EOF
  return $RC
}
B=$(cap "$MEM_S" $((TP_S + PYTEST_S)))
part "b. memory target (budget ${B}s)"
if [ "$B" -ge 20 ]; then memory_target; done_part "b. memory target" $?
else done_part "b. memory target" "skipped (${B}s)"; fi

# c. The throughput set: one process per case, in priority order until the budget is spent.
C=$(cap "$TP_S" "$PYTEST_S")
part "c. throughput (budget ${C}s)"
if [ "$C" -ge 60 ]; then
  TP=(bench/throughput.py --target gpu --budget $((C - 15)) --out "$OUT/throughput_gpu.json"
      --log "$OUT/throughput_cases.log")
  [ "$DRY" = 1 ] && TP+=(--dry-run)
  # shellcheck disable=SC2086
  JAX_COMPILATION_CACHE_DIR=$CACHE timeout -k 10 "$C" "$PY" "${TP[@]}" ${THROUGHPUT_ARGS:-}
  done_part "c. throughput" $?
else
  done_part "c. throughput" "skipped (${C}s)"
fi

# d. The test suite on the device: SIGINT at the cap (pytest then prints its summary of what ran).
device_tests() {
  PT_IGNORE=(--ignore=tests/test_parallel.py --ignore=tests/test_parallel_8_devices.py
             --ignore=tests/test_parallel_hosts.py)
  if [ "$DRY" = 1 ]; then
    PT=(-m pytest --collect-only -q -p no:cacheprovider -n0 "${PT_IGNORE[@]}")
  else
    read -r -a PT_ARGS <<< "${PYTEST_ARGS:--x -q -p no:cacheprovider -n 8}"
    PT=(-m pytest "${PT_ARGS[@]}" "${PT_IGNORE[@]}")
  fi
  echo "$PY ${PT[*]}"
  XLA_PYTHON_CLIENT_PREALLOCATE=false timeout -s INT -k 20 "$D" "$PY" "${PT[@]}" > "$OUT/pytest_gpu.log" 2>&1
  RC=$?
  tail -n 15 "$OUT/pytest_gpu.log"
  [ "$RC" = 124 ] && echo "pytest: stopped at the ${D}s cap (the summary above counts what ran)"
  return $RC
}
D=$(cap "$PYTEST_S" 0)
part "d. pytest (cap ${D}s)"
if [ "$D" -ge 20 ]; then device_tests; done_part "d. pytest" $?
else done_part "d. pytest" "skipped (${D}s)"; fi

# e. The memory table with what is left (each case compiles the step and refresh programs and runs a step).
E=$(( $(left) - 10 ))
part "e. memory table (budget ${E}s)"
if [ -f bench/memory_fit.py ] && [ "$E" -ge "$([ "$DRY" = 1 ] && echo 45 || echo 90)" ]; then
  MF=(--target gpu --sections 1b --out_dir "$OUT" --timeout $(( E / 2 < 75 ? E / 2 : 75 )))
  [ "$DRY" = 1 ] && MF=(--target gpu --sections 1b --dry_run --out_dir "$OUT" --timeout 60)
  timeout -k 10 "$E" "$PY" bench/memory_fit.py "${MF[@]}"
  done_part "e. memory table" $?
else
  echo "memory table skipped: ${E}s left"
  done_part "e. memory table" skipped
fi

part "done"
printf '%s\n' "${SUMMARY[@]}"
echo "total $(( $(date +%s) - START ))s of ${TOTAL}s; files in \$OUT:"
ls -la "$OUT"
N=$(find "$OUT" -type f | wc -l)
[ "$N" -gt 8 ] && echo "WARNING: $N files in \$OUT: only 8 come back from a device run"
[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ] && rm -rf "$CACHE"
sleep 1  # tee writes the last lines
exit 0
