"""Which process of a multi-process run is gone, said in one line within seconds.

When a process dies (killed, out of memory, its host lost), the others either fail in their
next collective or block in it. JAX's coordination service notices only after its heartbeat
timeout (100 s) and then aborts every survivor with pages of C++ logs; its own heartbeats are
not readable from Python. So each process bumps a counter in the service's key-value store every
second from a daemon thread, which also watches the others' counters: one that has not moved for
`LOST_AFTER_S` (and whose process did not say it was done) names the lost process, and this
process exits with code 4 in one line. A failed collective asks the same counters at once
(`lost_processes`). Process 0 hosts the service: when it dies, jaxlib's client aborts the
survivors at once with its own log (its hook for that, `missed_heartbeat_callback`, fails with
std::bad_cast in jaxlib 0.10).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time

import jax

_ALIVE = "lowrank_jax/alive/"
_DONE = "lowrank_jax/done/"
BEAT_S = 1.0
# Silence that means a peer is gone (a loaded host can starve a thread for seconds); the
# environment variable LOWRANK_LOST_AFTER_S sets another.
LOST_AFTER_S = float(os.environ.get("LOWRANK_LOST_AFTER_S", "30"))


def _client():
  from jax._src import distributed

  return distributed.global_state.client


def _others_done(client) -> set[str]:
  return {key[len(_DONE):] for key, _ in client.key_value_dir_get(_DONE)}


_stderr = 2  # a copy of stderr taken at start: a save holds file descriptor 2 while it writes


def start() -> None:
  """Beat and watch from a daemon thread (after `jax.distributed.initialize`)."""
  global _stderr
  client, me, _stderr = _client(), jax.process_index(), os.dup(2)

  def beat():
    changed: dict[str, tuple[str, float]] = {}  # process -> (its counter, when it last moved)
    while True:
      try:
        client.key_value_increment(f"{_ALIVE}{me}", 1)
        counters = {key[len(_ALIVE):]: value for key, value in client.key_value_dir_get(_ALIVE)}
        done = _others_done(client)
      except Exception:  # noqa: BLE001 -- the coordination service is gone: jaxlib says so itself
        return
      now = time.monotonic()
      for process, value in counters.items():
        if process == str(me) or process in done:
          continue
        if changed.get(process, (None,))[0] != value:
          changed[process] = (value, now)
        elif now - changed[process][1] > LOST_AFTER_S:
          exit_lost(f"no sign of life for {LOST_AFTER_S:.0f} s", [int(process)])
      time.sleep(BEAT_S)

  threading.Thread(target=beat, name="lowrank-liveness", daemon=True).start()


def mark_done() -> None:
  """Tell the others this process is leaving on purpose: its silence is not a loss."""
  client = _client()
  if client is not None:
    try:
      client.key_value_set(f"{_DONE}{jax.process_index()}", "1", allow_overwrite=True)
    except Exception:  # noqa: BLE001 -- the service is gone: nobody is left to tell
      pass


def lost_processes(watch_s: float = 5.0) -> list[int]:
  """The other processes whose counters did not move over `watch_s` seconds and that are not
  done (asked after a failed collective). When the service cannot be reached, or does not answer
  within seconds, process 0, which hosts it, is the one lost."""
  client = _client() if jax.process_count() > 1 else None
  if client is None:
    return []

  def read():
    return dict(client.key_value_dir_get(_ALIVE)), _others_done(client)

  pool = concurrent.futures.ThreadPoolExecutor(1)  # a call to a dead service may hang: bounded here
  try:
    before, _ = pool.submit(read).result(timeout=10)
    time.sleep(watch_s)
    after, done = pool.submit(read).result(timeout=10)
  except Exception:  # noqa: BLE001 -- unreachable or silent service
    return [0] if jax.process_index() != 0 else []
  finally:
    pool.shutdown(wait=False)
  return [i for i in range(jax.process_count()) if i != jax.process_index() and str(i) not in done
          and after.get(f"{_ALIVE}{i}") == before.get(f"{_ALIVE}{i}")]


def exit_lost(reason: str, lost: list[int] | None = None) -> None:
  """Say in one line which process this one lost contact with (`lost`, else found out here), and
  exit now (code 4): a normal exit would wait at the service's shutdown barrier for the dead peer."""
  lost = lost_processes() if lost is None else lost
  reason = " ".join(reason.split())[:200]
  line = (f"error: process {jax.process_index()} of {jax.process_count()} lost contact with process(es) "
          f"{', '.join(map(str, lost)) or '(unknown)'} ({reason}); checkpoints already written are intact: "
          "relaunch every process to resume from the newest\n")
  sys.stderr.flush()
  os.write(_stderr, ("\n" + line).encode())  # (a line of its own, whatever was half written)
  os._exit(4)
