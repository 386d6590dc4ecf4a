"""What the bench scripts share: provenance (`meta`), the results writer, config access, constants.

Scripts are run as `python bench/NAME.py` from the repository root with the package installed
(editable): their own folder is on sys.path, so `from _common import meta` works. Importing this
module also makes the repository's `configs/` importable as the package `configs` (config files
import each other as `from configs import base`) without putting the repository root on sys.path.

Every result JSON carries a top-level "meta" (`meta()`): the commit it was measured at, whether
tracked files had uncommitted changes, the UTC date, package versions, the device, the load
average at the start and the script's arguments. `python bench/_common.py` prints it.

Only the standard library is imported here at module level: bench/torch_peer.py runs in a venv
without JAX, and the parents of per-case child processes must not start an accelerator.
"""

from __future__ import annotations

import ast
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from typing import Any

from lowrank_jax.data import samples

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'bench', 'results')
# The team's offline data (C4 sample, tokenizers, TFDS); LOWRANK_DATA_DIR points elsewhere (e.g. a
# copy carried to a GPU machine).
SHARED_DATA = os.environ.get('LOWRANK_DATA_DIR') or os.path.normpath(os.path.join(ROOT, '..', 'shared', 'data'))
T5_VOCAB = 32101  # the C4 T5 SentencePiece vocabulary as our tokenizer reports it (padded to 32128)
VERSIONED = ('jax', 'jaxlib', 'flax', 'optax', 'numpy')


# --- configs ----------------------------------------------------------------------------------

def _register_configs() -> None:
  """`configs` = this repository's configs/ (a package whose files import each other by that name)."""
  init = os.path.join(ROOT, 'configs', '__init__.py')
  loaded = sys.modules.get('configs')
  if loaded is not None and os.path.abspath(getattr(loaded, '__file__', None) or '') == init:
    return  # already imported from here (e.g. under pytest, whose path holds the root)
  spec = importlib.util.spec_from_file_location('configs', init, submodule_search_locations=[os.path.dirname(init)])
  module = importlib.util.module_from_spec(spec)
  sys.modules['configs'] = module
  spec.loader.exec_module(module)


_register_configs()


# The paper configs stream allenai/c4 with the T5 tokenizer from the Hub; a memory or speed bench
# needs neither, only the vocabulary: the sample shipped in the package has the recipe's T5
# vocabulary and resolves offline. (Not data.preset=sample, which also shrinks the run.)
OFFLINE_DATA = {"data.source": "jsonl", "data.path": str(samples.C4_TRAIN),
                "data.eval_path": str(samples.C4_VALIDATION), "data.tokenizer": str(samples.T5_TOKENIZER)}


def offline_data(config):
  """`config` reading the shipped sample (`OFFLINE_DATA`) in place of the Hub."""
  for key, value in OFFLINE_DATA.items():
    set_dotted(config, key, value)
  return config


def config_module(name: str):
  """The module configs/<name>.py (e.g. 'llama_130m_galore')."""
  return importlib.import_module(f'configs.{name}')


def load_config(path: str, overrides: list[str] = ()):
  """`get_config()` of a config file given by its path, with KEY=VALUE overrides applied."""
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return apply_overrides(module.get_config(), overrides)


def get_dotted(config, key: str):
  """`config.a.b.c` for key 'a.b.c' (KeyError when a part is missing)."""
  node = config
  for part in key.split('.'):
    node = node[part]
  return node


def has_dotted(config, key: str) -> bool:
  try:
    get_dotted(config, key)
  except (KeyError, AttributeError, TypeError):
    return False
  return True


def set_dotted(config, key: str, value) -> None:
  """`config.a.b.c = value` for key 'a.b.c' on an ml_collections ConfigDict."""
  *parents, leaf = key.split('.')
  node = get_dotted(config, '.'.join(parents)) if parents else config
  node[leaf] = value


def apply_overrides(config, overrides: list[str]):
  """Each 'a.b.c=VALUE' set on `config`; VALUE is a Python literal when it parses as one, else a string."""
  for item in overrides:
    key, _, raw = item.partition('=')
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = raw
    set_dotted(config, key, value)
  return config


# --- provenance -------------------------------------------------------------------------------

def _git(*args: str) -> str:
  # --no-optional-locks: reading the status never rewrites the index (another process may be using it).
  return subprocess.run(['git', '--no-optional-locks', *args], cwd=ROOT, capture_output=True, text=True,
                        check=True, timeout=60).stdout


def git_state() -> dict[str, Any]:
  """{'commit': HEAD, 'dirty': tracked files differ from it, 'dirty_files': [...]}.

  Without git (a copy of the tree on another machine) the commit is LOWRANK_COMMIT's, if set.
  """
  try:
    commit = _git('rev-parse', 'HEAD').strip()
    status = _git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError) as e:
    return {'commit': os.environ.get('LOWRANK_COMMIT'), 'dirty': None,
            'git_error': f'{type(e).__name__}: {e}'[:200]}
  changed = sorted(line[3:] for line in status.splitlines() if line.strip())
  return {'commit': commit, 'dirty': bool(changed), 'dirty_files': changed}


def versions() -> dict[str, str | None]:
  """python and the packages in VERSIONED: the imported module's version, else the installed one."""
  out: dict[str, str | None] = {'python': platform.python_version()}
  for name in VERSIONED:
    version = getattr(sys.modules.get(name), '__version__', None)
    if version is None:
      try:
        version = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        version = None
    out[name] = version
  return out


_DEVICE_PROBE = ('import json, jax; d = jax.devices(); '
                 'print(json.dumps({"platform": d[0].platform, "kind": d[0].device_kind, "count": len(d)}))')


def device() -> dict[str, Any]:
  """{'platform', 'kind', 'count'} of jax.devices().

  In this process when it has imported JAX (its flags and platform as the script set them);
  otherwise in a child process, so that a parent of per-case children never starts (and holds)
  an accelerator itself.
  """
  if 'jax' in sys.modules:
    import jax

    devices = jax.devices()
    return {'platform': devices[0].platform, 'kind': devices[0].device_kind, 'count': len(devices)}
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  try:
    out = subprocess.run([sys.executable, '-c', _DEVICE_PROBE], capture_output=True, text=True, env=env,
                         timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])
  except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
    return {'error': f'{type(e).__name__}: {e}'[:200]}


def _arguments(args: Any) -> Any:
  if args is None:
    return sys.argv[1:]
  if isinstance(args, (list, tuple, dict)):
    return args
  return vars(args)  # an argparse.Namespace


def meta(args: Any = None, **extra: Any) -> dict[str, Any]:
  """Where and how a result was measured; call it when the script starts (the load average is then).

  Args:
    args: the script's arguments (an argparse.Namespace, or a list; default sys.argv[1:]).
    **extra: script-specific fields (e.g. OPENBLAS_NUM_THREADS).
  """
  caller = sys._getframe(1).f_globals.get('__file__')  # pylint: disable=protected-access
  return {
      **git_state(),
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
      'script': os.path.relpath(os.path.abspath(caller), ROOT) if caller else None,
      'args': _arguments(args),
      'versions': versions(),
      'device': device(),
      'cpu_count': os.cpu_count(),
      'machine': platform.machine(),
      'loadavg_start': list(os.getloadavg()),
      **extra,
  }


# --- output -----------------------------------------------------------------------------------

def write_json(path: str, payload: dict[str, Any], *, meta: dict[str, Any] | None = None,  # pylint: disable=redefined-outer-name
               indent: int = 1) -> str:
  """`payload` as JSON at `path`, with `meta` as its first key when given; returns the path.

  Written to a temporary file and moved into place: a run stopped mid-write leaves the previous
  file, never half of one.
  """
  if meta is not None:
    payload = {'meta': meta, **{k: v for k, v in payload.items() if k != 'meta'}}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(payload, f, indent=indent, default=str)
  os.replace(path + '.tmp', path)
  return path


def result_path(name: str) -> str:
  """bench/results/<name>."""
  return os.path.join(RESULTS, name)


def pyplot():
  """matplotlib's pyplot on a file backend, or None (with a note) when the `bench` extra is absent."""
  try:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib not installed (pip install -e '.[bench]'): no plot written")
    return None
  return plt


if __name__ == '__main__':
  print(json.dumps(meta([]), indent=1))
