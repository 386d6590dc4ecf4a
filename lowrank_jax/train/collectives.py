"""What a compiled step communicates: its collectives, read from the optimized HLO.

Used to check and measure that LTE heads spread over devices talk only at merges:
a collective inside a `lax.cond` branch (the merge) runs only when that branch is
taken, every other one runs every step. Sizes are those of each collective's
result (for an all-gather, the gathered array).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
                "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE = re.compile(r"=\s*(.*?)\s+(" + "|".join(KINDS) + r")(?:-start)?\(")


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # one of KINDS
  computation: str  # the HLO computation holding it
  conditional: bool  # inside a lax.cond branch: runs only when that branch is taken
  shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, shape) of every result

  @property
  def bytes(self) -> int:
    total = 0
    for dtype, shape in self.shapes:
      n = 1
      for d in shape:
        n *= d
      total += n * _DTYPE_BYTES.get(dtype, 4)
    return total


def _computations(hlo: str) -> dict[str, list[str]]:
  """Computation name -> its instruction lines (the entry computation is 'ENTRY')."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      head = line.split()
      current = "ENTRY" if head[0] == "ENTRY" else head[0].lstrip("%")
      comps[current] = []
    elif current is not None and line.strip() and line.strip() != "}":
      comps[current].append(line)
  return comps


def _callees(lines: Iterable[str]) -> set[str]:
  names = set()
  for line in lines:
    names.update(_CALLS.findall(line))
    for group in _BRANCHES.findall(line):
      names.update(n.strip().lstrip("%") for n in group.split(",") if n.strip())
  return names


def collectives(hlo: str) -> list[Collective]:
  """Every collective of an optimized HLO module (`compiled.as_text()`)."""
  comps = _computations(hlo)
  # Computations reachable from a conditional's branches run only when it is taken.
  pending = [n for lines in comps.values() for line in lines if " conditional(" in line
             for n in _callees([line])]
  conditional: set[str] = set()
  while pending:
    name = pending.pop()
    if name in conditional or name not in comps:
      continue
    conditional.add(name)
    pending.extend(_callees(comps[name]))
  found = []
  for name, lines in comps.items():
    for line in lines:
      match = _COLLECTIVE.search(line)
      if match is None:
        continue
      shapes = tuple((dt, tuple(int(d) for d in dims.split(",") if d))
                     for dt, dims in _ARRAY.findall(match.group(1)))
      found.append(Collective(match.group(2), name, name in conditional, shapes))
  return found


def bytes_per_step(hlo: str) -> tuple[int, int]:
  """(bytes communicated on every step, bytes communicated only inside conditional branches)."""
  found = collectives(hlo)
  return (sum(c.bytes for c in found if not c.conditional),
          sum(c.bytes for c in found if c.conditional))
