"""Hugging Face Hub ids for `model.init_from` and `data.tokenizer`: an id becomes a local snapshot.

`resolve(key, spec, kind)` leaves a local path as it is and turns `owner/name` (or
`owner/name@revision`) into the directory of its snapshot in the Hugging Face cache, fetching
only the files the run reads (`huggingface_hub.snapshot_download`, so the cache, HF_HUB_OFFLINE
and HF_TOKEN work as in every other Hugging Face tool). The settings resolve both keys as they
read them, so everything below sees a local directory and the models and data libraries take
paths only. `spec_of(path)` turns a snapshot back into `owner/name@commit`: what config.json
records, so a run says which commit its weights came from and its config.json resolves to the
same files.
"""

from __future__ import annotations

import os
import re

from lowrank_jax.models import pretrained
from lowrank_jax.train.errors import ConfigError

# What a run reads of a repository: a checkpoint's config, weights and the tokenizer files export
# copies beside them; a tokenizer's files and the config.json holding its special token ids.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "tokenizer_config.json",
                    "special_tokens_map.json")
PATTERNS = {
    "checkpoint": (pretrained.CONFIG_FILE, pretrained.SINGLE_FILE, "model-*-of-*.safetensors", pretrained.INDEX_FILE,
                   *pretrained.TOKENIZER_FILES, *_TOKENIZER_FILES),
    "tokenizer": (*_TOKENIZER_FILES, pretrained.CONFIG_FILE),
}
# owner/name[@revision] as the Hub spells them; a path starting with '/', '.' or '~' is never an id.
_ID = re.compile(r"(?P<repo>\w[\w.-]*/[\w.-]*\w)(?:@(?P<revision>[\w./-]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def checkpoint(key: str, spec: str) -> str:
  """A settings check: `spec` as a local checkpoint directory (see `resolve`)."""
  return resolve(key, spec, "checkpoint")


def tokenizer(key: str, spec: str) -> str:
  """A settings check: `spec` as a local tokenizer path (see `resolve`)."""
  return resolve(key, spec, "tokenizer")


# What a data error that needs the Hub adds: the two ways to train without it.
DATA_WITHOUT_HUB = ("; without the Hub: --config.data.preset=sample (the C4 sample shipped with lowrank-jax), or "
                    "local files: --config.data.source=jsonl --config.data.path=FILES --config.data.tokenizer=PATH")

def resolve(key: str, spec: str, kind: str) -> str:
  """The local path for config value `spec` of `key`: a path that exists as it is; a Hub id (kind
  'checkpoint' or 'tokenizer') as its snapshot directory, fetched into the cache when missing.

  Anything else is returned unchanged, for the setting's own check to call a missing file.
  Raises `ConfigError` (one line naming `key` and the id) when the id cannot be had.
  """
  if not isinstance(spec, str) or spec in ("", "byte") or os.path.exists(os.path.expanduser(spec)):
    return spec
  match = _ID.fullmatch(spec)
  if match is None or "--" in match["repo"] or ".." in match["repo"]:
    return spec
  repo, revision = match["repo"], match["revision"]
  try:
    import huggingface_hub
    from huggingface_hub import errors
  except ImportError:
    route = DATA_WITHOUT_HUB if key.startswith("data.") else ""
    raise ConfigError(key, f"{spec!r} is no local path, and a Hugging Face Hub id needs huggingface_hub: "
                      f"pip install 'lowrank-jax[hf]'{route}") from None
  what, cache = f"{spec!r} (no local path of that name either)", cache_dir()
  try:
    path = huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache,
                                             allow_patterns=list(PATTERNS[kind]), local_files_only=offline())
  except errors.GatedRepoError:
    raise ConfigError(key, f"{spec!r} is a gated repository: accept its terms on https://huggingface.co/{repo} "
                      f"and {_LOGIN}") from None
  except errors.RepositoryNotFoundError:
    raise ConfigError(key, f"no repository {what} on the Hugging Face Hub, or a private one: {_LOGIN}") from None
  except errors.RevisionNotFoundError:
    raise ConfigError(key, f"{spec!r}: the repository has no revision {revision!r}") from None
  except errors.LocalEntryNotFoundError as e:  # offline or unreachable, and not (wholly) in the cache
    why = ("HF_HUB_OFFLINE=1 forbids downloading it; run once with network access or unset HF_HUB_OFFLINE"
           if offline() else f"the Hub could not be reached ({_first_line(e.__cause__ or e)})")
    route = DATA_WITHOUT_HUB if key.startswith("data.") else ""
    raise ConfigError(key, f"{what} is not (wholly) in the Hugging Face cache {cache}, and {why}{route}") from None
  except errors.HfHubHTTPError as e:
    status = getattr(getattr(e, "response", None), "status_code", None)
    hint = f": {_LOGIN}" if status in (401, 403) else ""
    raise ConfigError(key, f"{spec!r}: the Hugging Face Hub answered {_first_line(e)}{hint}") from None
  if kind == "checkpoint" and not {pretrained.SINGLE_FILE, pretrained.INDEX_FILE} & set(pretrained.read_existing(path)):
    why = ("its snapshot in the cache lacks them and HF_HUB_OFFLINE=1 forbids downloading them" if offline() else
           "lowrank-jax reads no other format")
    raise ConfigError(key, f"{spec!r} holds no safetensors weights ({pretrained.SINGLE_FILE}, or shards with "
                      f"{pretrained.INDEX_FILE}): {why}")
  return path


def spec_of(path: str) -> str:
  """`owner/name@commit` for a snapshot directory of the Hugging Face cache, else `path`."""
  found = origin(path)
  return f"{found[0]}@{found[1]}" if found else path


def name_of(path: str) -> str:
  """How logs name a checkpoint: `owner/name` for a Hub snapshot, else the directory's name."""
  found = origin(path)
  return found[0] if found else os.path.basename(os.path.normpath(path))


def origin(path: str) -> tuple[str, str] | None:
  """(repo id, commit) of a model snapshot in the Hugging Face cache (`cache_dir`), else None."""
  if not isinstance(path, str) or not path:
    return None
  parent, commit = os.path.split(os.path.realpath(os.path.expanduser(path)))
  folder, snapshots = os.path.split(parent)
  cache, name = os.path.split(folder)
  if (snapshots != "snapshots" or not _COMMIT.fullmatch(commit) or not name.startswith("models--")
      or cache != os.path.realpath(cache_dir())):
    return None
  return name[len("models--"):].replace("--", "/"), commit


def cache_dir() -> str:
  """The Hugging Face Hub cache as `huggingface_hub` finds it, read now (the library reads the
  environment once, at import)."""
  env = os.environ
  home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
  return os.path.expanduser(env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub"))


def offline() -> bool:
  """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: the cache only, no request."""
  value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
  return value.upper() in ("1", "ON", "YES", "TRUE")


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
