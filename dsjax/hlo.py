"""Reading XLA's optimized HLO text: which instructions run inside the while loops of a compiled program and what
they write, so tests and benchmarks can assert structural facts (e.g. "the decode loop writes no weight-sized
buffer") that guard the accelerator path on a machine without one.

  text = jax.jit(f).trace(*args).lower().compile().as_text()
  for op in loop_buffers(text): print(op.opcode, op.shape, op.elements)

XLA has no public parser of its text form in Python; this reads only what it needs: computation headers, each
instruction's result shape and opcode, and the computations it calls (body=, condition=, calls=, to_apply=,
branch_computations=).
"""
from __future__ import annotations

import dataclasses
import math
import re

# A computation header: `%name (params...) -> type {` or `ENTRY %name ...`.
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
# An instruction: `[ROOT] %name = <type> opcode(`; the type is an array `f32[2,3]{1,0}` or a tuple `(...)`.
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\(')
_ARRAY = re.compile(r'^([a-z]+[0-9]*)\[([0-9,]*)\]')
_CALLED = re.compile(r'(?:body|condition|calls|to_apply)=%?([\w.\-]+)|branch_computations=\{([^}]*)\}')
# Instructions that write no new buffer: they name (parts of) existing ones.
NO_BUFFER = frozenset({'parameter', 'get-tuple-element', 'tuple', 'bitcast', 'constant', 'while', 'call',
                       'conditional', 'after-all', 'opt-barrier', 'partition-id', 'replica-id'})


@dataclasses.dataclass(frozen=True)
class Op:
  """One HLO instruction: its computation, name, opcode, result dtype and dims (None for tuples), the line."""
  computation: str
  name: str
  opcode: str
  dtype: str | None
  shape: tuple[int, ...] | None
  line: str

  @property
  def elements(self) -> int:
    return 0 if self.shape is None else math.prod(self.shape)


def parse(text: str) -> tuple[dict[str, list[Op]], dict[str, set[str]], str | None]:
  """(instructions of each computation, computations each one calls, the entry computation's name)."""
  ops: dict[str, list[Op]] = {}
  calls: dict[str, set[str]] = {}
  entry = current = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header and '=' not in line.split('{')[0].split('(')[0]:
      current = header.group(2)
      ops[current], calls[current] = [], set()
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    instruction = _INSTRUCTION.match(line)
    if not instruction:
      continue
    name, result, opcode = instruction.groups()
    array = _ARRAY.match(result)
    dtype = shape = None
    if array:
      dtype = array.group(1)
      shape = tuple(int(d) for d in array.group(2).split(',') if d)
    ops[current].append(Op(current, name, opcode, dtype, shape, line.strip()))
    for single, several in _CALLED.findall(line):
      for callee in ([single] if single else re.split(r'[,\s]+', several)):
        if callee:
          calls[current].add(callee.lstrip('%'))
  return ops, calls, entry


def reachable(calls: dict[str, set[str]], roots: set[str]) -> set[str]:
  """Every computation reachable from `roots` through calls (the roots included)."""
  seen, todo = set(), list(roots)
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo.extend(calls.get(name, ()))
  return seen


def _loop_computations(ops: dict[str, list[Op]], calls: dict[str, set[str]]) -> set[str]:
  """The bodies and conditions of every while loop, and every computation they call."""
  roots = set()
  for computation in ops.values():
    for op in computation:
      if op.opcode == 'while':
        roots |= {c for c in calls[op.computation]
                  if re.search(rf'(?:body|condition)=%?{re.escape(c)}\b', op.line)}
  return reachable(calls, roots)


def top_level_ops(text: str, computations: set[str] | None = None) -> list[Op]:
  """Instructions that write a buffer of their own (in `computations`, default all): not the ones inside fusions
  (a fusion writes only its result), nor those in NO_BUFFER."""
  ops, calls, _ = parse(text)
  fused = {c for name in ops for op in ops[name] if op.opcode == 'fusion'
           for c in calls[name] if re.search(rf'calls=%?{re.escape(c)}\b', op.line)}
  names = computations if computations is not None else set(ops)
  return [op for name in sorted(names) if name not in fused for op in ops[name] if op.opcode not in NO_BUFFER]


def loop_buffers(text: str) -> list[Op]:
  """The buffers the program's while loops write on every iteration (bodies, conditions, nested loops)."""
  ops, calls, _ = parse(text)
  return top_level_ops(text, _loop_computations(ops, calls))
