"""The figures the README and docs quote agree with bench/results/, and the rendered results pages are
what docs/render.py writes from those files now (docs/figures.py, docs/render.py; no JAX)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _docs_module(name: str):
  """docs/<name>.py as a module (docs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"docs_{name}", REPO / "docs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # (its dataclasses look their module up)
  spec.loader.exec_module(module)
  return module


figures = _docs_module("figures")
render = _docs_module("render")


def test_every_marked_figure_agrees_with_its_results_file():
  """Each `<!-- fig: FILE EXPR UNIT -->` figure rounds from its file's value; no marker is malformed
  and no memory figure is unmarked. Fix the page (or re-run the bench); `python docs/figures.py --list`
  shows each figure beside its file's value."""
  found, problems = figures.check()
  assert not problems, "\n".join(map(str, problems))
  by_page = {}
  for figure in found:
    by_page[figure.doc] = by_page.get(figure.doc, 0) + 1
  # The pages that quote results keep their markers (a marker deleted with its figure's line is fine;
  # the README losing all of them is not).
  assert by_page.get("README.md", 0) >= 15 and by_page.get("docs/int8-weights.md", 0) >= 5, by_page


def test_results_pages_are_rendered_from_the_results_files():
  """docs/results/*.md are what docs/render.py writes from bench/results/ now: a new or changed result
  without regenerated pages fails here. Fix: python docs/render.py."""
  for path, page in render.pages().items():
    if path.parent.name != "results":
      continue  # configuration.md: tests/test_train_config.py (it needs the trainer)
    assert path.read_text() == page(), f"{path.relative_to(REPO)} is out of date: run python docs/render.py"


def _page(tmp_path: Path, text: str, data: dict) -> Path:
  (tmp_path / "bench" / "results").mkdir(parents=True)
  (tmp_path / "docs").mkdir()
  (tmp_path / "bench" / "results" / "r.json").write_text(json.dumps(data))
  (tmp_path / "README.md").write_text(text)
  return tmp_path


DATA = {"rows": [{"name": "a", "target": "v5e", "peak_bytes": 9.514 * 2**30, "overrides": {"model.remat": "block"}},
                 {"name": "a", "target": "v5p", "peak_bytes": 3 * 2**30, "overrides": {}},
                 {"name": "b c", "target": "v5e", "peak_bytes": 2**29}],
        "ratio": 0.98765, "count": 1234}


@pytest.mark.parametrize("quoted, marker, ok", [
    ("9.51 GiB", "rows[name=a,target=v5e].peak_bytes GiB", True),
    ("9.5 GiB", "rows[name=a,target=v5e].peak_bytes GiB", True),
    ("9.52 GiB", "rows[name=a,target=v5e].peak_bytes GiB", False),    # 9.514 rounds to 9.51
    ("9,742.3 MiB", "rows[name=a,target=v5e].peak_bytes MiB", True),   # 9.514 * 1024 = 9,742.336
    ("0.988", "ratio", True),
    ("0.987", "ratio", False),
    ("98.8%", "ratio %", True),
    ("1,234", "count", True),
    ("1,235", "count", False),
    ("3.17", "rows[name=a,target=v5e].peak_bytes / rows[name=a,target=v5p].peak_bytes", True),
    ("6.51", "rows[name=a,target=v5e].peak_bytes - 3 * 2**30 GiB", True),
    ("0.5 GiB", 'rows[name="b c"].peak_bytes GiB', True),
    ("9.51 GiB", "rows[overrides.model.remat=block].peak_bytes GiB", True),
])
def test_a_figure_is_checked_to_its_quoted_precision(tmp_path, quoted, marker, ok):
  repo = _page(tmp_path, f"text\n| x | **{quoted}<!-- fig: r.json {marker} -->** |\n", DATA)
  found, problems = figures.check(repo)
  assert len(found) == 1 and found[0].quoted == quoted.split()[0].rstrip("%")
  assert (not problems) == ok, problems
  if not ok:  # one line: the page and line, what it quotes, what the file says
    assert len(problems) == 1 and str(problems[0]).startswith(f"README.md:2: quoted {found[0].quoted}, but ")


@pytest.mark.parametrize("text, message", [
    ("9.51 GiB<!-- fig: r.json rows[name=a].peak_bytes GiB -->", "2 records match"),     # ambiguous selector
    ("9.51 GiB<!-- fig: r.json rows[name=z].peak_bytes GiB -->", "0 records match"),
    ("9.51 GiB<!-- fig: r.json rows[0].peak GiB -->", "rows[0].peak: no such key"),
    ("9.51 GiB<!-- fig: missing.json ratio -->", "no such file"),
    ("9.51 GiB<!-- fig r.json ratio -->", "write <!-- fig: FILE EXPR [UNIT] -->"),
    ("a<!-- fig: r.json ratio -->", "has no number before it"),
    ("the step needs 9.51 GiB on one chip", "'9.51 GiB' has no marker"),
])
def test_a_marker_that_cannot_be_checked_is_a_problem(tmp_path, text, message):
  repo = _page(tmp_path, f"{text}\n", DATA)
  _, problems = figures.check(repo)
  assert len(problems) == 1 and message in str(problems[0]) and str(problems[0]).startswith("README.md:1: "), problems


def test_what_needs_no_marker(tmp_path):
  """Goals written with a comparison, headings, code, nofig-marked figures and numbers inside words."""
  text = ("## 7B on one 16 GiB chip\n"
          "goal <= 14 GiB, record < 12 GB; the paper's 15.26 GB<!-- nofig: the paper's -->; bf16 and 7b\n"
          "`--mem=16GiB` and a run of 3 GiB:\n"
          "```\npeak 3.2 GiB\n```\n")
  found, problems = figures.check(_page(tmp_path, text, DATA))
  assert not found and [str(p) for p in problems] == [
      "README.md:3: '3 GiB' has no marker: add <!-- fig: FILE EXPR UNIT --> after it "
      "(or <!-- nofig: WHY --> where no results file holds it)"]


def _quality_entry(loss: float, refs: dict, losses: dict, **extra) -> dict:
  """One bench/quality.py entry, its ratios computed here from the references' losses."""
  entry = {"eval_loss": loss, "eval_ppl": math.exp(loss), "seed_losses": [loss - 0.01, loss + 0.01],
           "seed_spread": 0.02, "best_lr": 1e-3, "best_at_edge": False, "sweep": {"0.001": {"eval_loss": loss}}, **extra}
  for key, ref in refs.items():
    entry[f"ppl_ratio_to_{key}"] = math.exp(loss - losses[ref])
  return entry


def test_the_quality_page_leads_with_the_fair_baseline(tmp_path, monkeypatch):
  """docs/results/quality.md names the fair baseline, gives each entry its three ratios and the groups'
  share of its lead; the --small section gives the ranks and the Spearman correlation, or says it is
  not measured."""
  tiny = {"adamw": 2.4, "adamw_groups_x4": 2.3, "muon": 2.1, "galore": 2.2}
  refs = {"adamw": "adamw", "adamw_groups": "adamw_groups_x4", "fair": "muon"}
  (tmp_path / "quality_quick.json").write_text(json.dumps({"references": refs, "methods": {
      m: _quality_entry(loss, refs, tiny) for m, loss in tiny.items()}}))
  monkeypatch.setattr(render, "RESULTS", tmp_path)
  text = render.quality_page()
  assert "**Fair baseline: `muon`**" in text and "(`adamw\\_groups\\_x4`)" not in text  # code spans unescaped
  # galore: x fair exp(0.1), x AdamW+groups exp(-0.1), x AdamW exp(-0.2); groups gain 0.1 of its 0.2 lead
  assert "| galore | 0.001 | 2.2000 (2.1900, 2.2100) | 9.03 | 0.020 | 1.105 | 0.905 | 0.819 | 50% |" in text
  assert "| muon (fair baseline) | 0.001 | 2.1000 (2.0900, 2.1100) | 8.17 | 0.020 | 1.000 | 0.819 | 0.741 | 33% |" in text
  assert "| adamw (AdamW) | 0.001 |" in text and "| adamw\\_groups\\_x4 (best AdamW with groups) | 0.001 |" in text
  assert "Not measured at this commit: `python bench/quality.py --small`" in text

  small = {"adamw_groups": 4.3, "muon": 4.2, "galore": 4.1}
  small_refs = {"adamw_groups": "adamw_groups", "fair": "galore"}
  names = list(small)
  (tmp_path / "quality_small.json").write_text(json.dumps({"references": small_refs, "methods": {
      m: _quality_entry(loss, small_refs, small) for m, loss in small.items()}, "rank_agreement": {
      "methods": names, "tiny_entries": ["adamw_groups_x4", "muon", "galore"],
      "tiny_eval_loss": [tiny[e] for e in ("adamw_groups_x4", "muon", "galore")],
      "small_eval_loss": [small[m] for m in names], "tiny_rank": [3, 1, 2], "small_rank": [3, 2, 1],
      "spearman": 0.5}}))
  text = render.quality_page()
  assert "**Fair baseline at this scale: `galore`**" in text
  assert "| galore | galore | 0.001 | - | 2.2000 | 4.1000 | 60.34 | 1.000 | 0.819 | 2 | 1 |" in text
  assert "over 3 methods: **0.500: the order changes**" in text
