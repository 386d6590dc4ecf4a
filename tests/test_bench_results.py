"""bench/ hygiene (no JAX, no compile): every result records the commit it was measured at, every
non-JSON result belongs to a JSON one, and the scripts share bench/_common.py instead of editing
sys.path."""

import glob
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
RESULTS = sorted(glob.glob(os.path.join(BENCH, "results", "*.json")))
OTHER_RESULTS = sorted(p for p in glob.glob(os.path.join(BENCH, "results", "*")) if not p.endswith(".json"))
SCRIPTS = sorted(glob.glob(os.path.join(BENCH, "*.py")))


def _read(path: str) -> str:
  with open(path) as f:
    return f.read()


def test_bench_has_results_and_scripts():
  assert RESULTS and SCRIPTS


@pytest.mark.parametrize("path", RESULTS, ids=os.path.basename)
def test_result_records_its_commit(path):
  result = json.loads(_read(path))
  meta = result.get("meta") if isinstance(result, dict) else None
  commit = meta.get("commit") if isinstance(meta, dict) else None
  assert isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit), (
      f"{os.path.relpath(path, ROOT)}: meta.commit is {commit!r}, not a 40-hex commit (bench/_common.py meta())")


@pytest.mark.parametrize("path", OTHER_RESULTS, ids=os.path.basename)
def test_non_json_result_follows_a_json_result(path):
  """A plot or journal is named after the JSON result it comes with (quality_quick.png, ..._lr.png)."""
  stems = [os.path.basename(p)[:-len(".json")] for p in RESULTS]
  name = os.path.basename(path)
  assert any(name.startswith(stem + sep) for stem in stems for sep in (".", "_")), (
      f"{os.path.relpath(path, ROOT)} has no JSON result of its own")


@pytest.mark.parametrize("path", SCRIPTS, ids=os.path.basename)
def test_script_leaves_sys_path_alone(path):
  text = _read(path)
  assert "sys.path.insert" not in text and "sys.path.append" not in text, (
      f"{os.path.relpath(path, ROOT)}: run scripts as `python bench/NAME.py` (their folder is on sys.path) "
      "and import what they share from bench/_common.py")


@pytest.mark.parametrize("path", [p for p in SCRIPTS if os.path.basename(p) != "_common.py"], ids=os.path.basename)
def test_script_uses_common(path):
  assert re.search(r"^from _common import |^import _common\b", _read(path), re.M), (
      f"{os.path.relpath(path, ROOT)} does not import bench/_common.py")
