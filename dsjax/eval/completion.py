"""Code completion exact match on held-out functions.

Each held-out Python file (the validation split of `cfg.data`) is parsed with `ast`; every top-level function and
method with a body on its own lines becomes one example: the prompt is the file text up to and including the
`def` header (and the docstring, with `include_docstring`), the target the next `target_lines` source lines of
the body. The model continues the prompt greedily; an example is an exact match when the first `target_lines`
lines of the continuation equal the target's, each line right-stripped and the whole stripped.

Two softer scores go with it, since a small model rarely completes a whole line exactly: `edit_similarity`, the
mean of difflib's ratio 2 * matched / (len(a) + len(b)) between the normalized continuation and target (the ES of
code-completion benchmarks, with difflib's matching in place of Levenshtein), and `target_bits_per_byte`, the
model's loss on the target lines and their line end after the same prompt (teacher-forced), in bits per UTF-8
byte over all examples.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import math
from typing import Any, Sequence

from flax import linen as nn
import jax
import ml_collections
import numpy as np

from dsjax.eval import scoring
from dsjax.model import layout
from dsjax.sample import sampler as sampler_lib
from dsjax.data import mixture
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer


@dataclasses.dataclass(frozen=True)
class Example:
  """One held-out function: `prompt` (text before the body) and `target` (the body's first lines)."""
  name: str      # '<file>:<qualified function name>'
  prompt: str
  target: str


def normalize(text: str, num_lines: int) -> str:
  """The first `num_lines` lines of `text`, each right-stripped, joined, and the whole stripped."""
  return '\n'.join(line.rstrip() for line in text.split('\n')[:num_lines]).strip()


def _is_docstring(node: ast.stmt) -> bool:
  return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str))


def extract_functions(source: str, file_name: str = '<source>', *, target_lines: int = 1,
                      include_docstring: bool = True) -> list[Example]:
  """The held-out examples of one Python file, in source order (top-level functions and methods of top-level
  classes; nested functions are skipped). Files that do not parse give none.

  A function whose body starts on its `def` line (`def f(): return 1`), or that holds nothing after its docstring
  (with `include_docstring`), gives no example. The target never runs past the function's last line.
  """
  try:
    tree = ast.parse(source)
  except (SyntaxError, ValueError):
    return []
  lines = source.split('\n')
  functions = []
  for node in tree.body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      functions.append((node.name, node))
    elif isinstance(node, ast.ClassDef):
      functions += [(f'{node.name}.{item.name}', item) for item in node.body
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))]
  examples = []
  for qualname, fn in functions:
    body = list(fn.body)
    if include_docstring and len(body) > 1 and _is_docstring(body[0]):
      body = body[1:]
    elif include_docstring and _is_docstring(body[0]):
      continue
    first = body[0]
    if lines[first.lineno - 1].encode('utf-8')[:first.col_offset].strip():
      continue  # the body shares a line with the header: `def f(): return 1`
    start = first.lineno - 1  # 0-based index of the body's first line
    end = min(start + target_lines, fn.end_lineno or len(lines))
    target = '\n'.join(lines[start:end])
    if not normalize(target, target_lines):
      continue
    prompt = '\n'.join(lines[:start]) + '\n'
    examples.append(Example(f'{file_name}:{qualname}', prompt, target))
  return examples


def held_out_examples(data_cfg: ml_collections.ConfigDict, *, max_examples: int = 200, target_lines: int = 1,
                      include_docstring: bool = True, max_per_file: int = 5) -> list[Example]:
  """Examples from the `.py` files (or any document that parses as Python) of the validation split of
  `data_cfg`, at most `max_per_file` per file (spread over the file) and `max_examples` in all."""
  examples: list[Example] = []
  for doc in mixture.load_split(data_cfg, 'validation'):
    found = extract_functions(doc.text, doc.name, target_lines=target_lines, include_docstring=include_docstring)
    if len(found) > max_per_file:
      found = [found[i] for i in np.linspace(0, len(found) - 1, max_per_file).round().astype(int)]
    examples += found
    if len(examples) >= max_examples:
      break
  return examples[:max_examples]


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> list[int]:
  """[bos] + tokens of `prompt`, keeping only the last `max_tokens` tokens when longer (then without bos)."""
  ids = [int(tokenizer.bos_id)] + [int(t) for t in tokenizer.encode(prompt)]
  return ids[-max_tokens:]


def prompt_budget(context: int, max_new_tokens: int) -> int:
  """Prompt tokens that fit a `context`-token window with `max_new_tokens` generated, keeping at least half of the
  window for the prompt."""
  return max(context - max_new_tokens, context // 2)


def edit_similarity(output: str, target: str, num_lines: int) -> float:
  """difflib's ratio (2 * matched characters / total characters, 1.0 for two empty strings) of the normalized
  first `num_lines` lines of `output` and `target`."""
  return difflib.SequenceMatcher(None, normalize(output, num_lines), normalize(target, num_lines),
                                 autojunk=False).ratio()


def target_bits_per_byte(model: nn.Module, params: Any, tokenizer, examples: Sequence[Example],
                         prompts: Sequence[Sequence[int]], *, max_new_tokens: int, batch_size: int = 8) -> float:
  """Bits per UTF-8 byte of each example's target plus its line end after its encoded prompt (`prompts`:
  encode_prompt's ids), summed over examples; targets are cut to `max_new_tokens` tokens, as generation is."""
  byte_lengths = tokenizer.token_byte_lengths()
  room = int(model.cfg.max_positions) + 1  # tokens a row may hold: inputs are all but the last
  rows, num_bytes = [], 0
  for ex, prompt in zip(examples, prompts):
    continuation = [int(t) for t in tokenizer.encode(ex.target + '\n')][:max_new_tokens][:room - len(prompt)]
    if not continuation:
      continue
    rows.append((list(prompt) + continuation, len(continuation)))
    num_bytes += int(byte_lengths[continuation].sum())
  if not rows:
    return 0.0
  nats = scoring.continuation_log_likelihoods(model, params, rows, pad_id=int(tokenizer.pad_id),
                                              batch_size=batch_size)
  return float(-nats.sum() / math.log(2) / max(num_bytes, 1))


def evaluate(model: nn.Module, params: Any, tokenizer, examples: Sequence[Example], *, target_lines: int = 1,
             max_new_tokens: int = 64, max_prompt_tokens: int | None = None, batch_size: int = 8,
             return_outputs: bool = False, score_targets: bool = True) -> dict[str, Any]:
  """Greedy completion of every example's prompt; returns {'exact_match': rate, 'matches', 'count',
  'edit_similarity'} (see the module doc), with `score_targets` 'target_bits_per_byte', and with `return_outputs`
  `outputs`, the generated texts.

  Prompts are cut to their last `max_prompt_tokens` tokens (default: what fits `model.cfg.max_positions` with
  `max_new_tokens`). A target longer than `max_new_tokens` tokens cannot match. Rows stop at EOS.
  """
  max_positions = int(model.cfg.max_positions)
  if max_prompt_tokens is None:
    max_prompt_tokens = max_positions - max_new_tokens
  if max_prompt_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in max_positions={max_positions}')
  prompts = [encode_prompt(tokenizer, ex.prompt, max_prompt_tokens) for ex in examples]
  longest = max((len(p) for p in prompts), default=1)
  sampler = sampler_lib.Sampler(model, max_len=longest + max_new_tokens)
  params = layout.for_decoding(params)  # once for all the batches below, not inside each generate call
  vocab_limit = int(tokenizer.vocab_size)
  outputs: list[str] = []
  # Rows sorted by prompt length, so a batch pads little and the sampler compiles few prompt widths.
  order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
  texts: dict[int, str] = {}
  for begin in range(0, len(order), batch_size):
    rows = order[begin:begin + batch_size]
    new = sampler.generate(params, [prompts[i] for i in rows], jax.random.key(0), max_new_tokens=max_new_tokens,
                           temperature=0.0, stop_ids=[int(tokenizer.eos_id)], pad_id=int(tokenizer.pad_id),
                           vocab_limit=vocab_limit)
    for i, tokens in zip(rows, new):
      texts[i] = tokenizer.decode(tokens)
  outputs = [texts[i] for i in range(len(prompts))]
  matches = [normalize(out, target_lines) == normalize(ex.target, target_lines) for out, ex in zip(outputs, examples)]
  similarity = [edit_similarity(out, ex.target, target_lines) for out, ex in zip(outputs, examples)]
  result: dict[str, Any] = {'exact_match': float(np.mean(matches)) if matches else 0.0, 'matches': int(sum(matches)),
                            'count': len(matches), 'edit_similarity': float(np.mean(similarity)) if similarity else 0.0}
  if score_targets:
    result['target_bits_per_byte'] = target_bits_per_byte(model, params, tokenizer, examples, prompts,
                                                          max_new_tokens=max_new_tokens, batch_size=batch_size)
  if return_outputs:
    result['outputs'] = outputs
  return result


def evaluate_held_out(cfg: ml_collections.ConfigDict, params: Any, *, model: nn.Module | None = None,
                      tokenizer=None, max_examples: int = 200, target_lines: int = 1,
                      max_new_tokens: int = 64) -> dict[str, Any]:
  """`evaluate` on the held-out functions of `cfg.data`'s validation split (prompt + continuation cut to the
  trained context `cfg.data.seq_len`, keeping at least half of it for the prompt)."""
  tokenizer = tokenizer or tokenizer_lib.from_config(cfg.data)
  model = model or Transformer(cfg.model)
  examples = held_out_examples(cfg.data, max_examples=max_examples, target_lines=target_lines)
  if not examples:
    return {'exact_match': 0.0, 'matches': 0, 'count': 0}
  context = min(int(cfg.data.seq_len), int(cfg.model.max_positions))  # the context length the model trained on
  return evaluate(model, params, tokenizer, examples, target_lines=target_lines, max_new_tokens=max_new_tokens,
                  max_prompt_tokens=prompt_budget(context, max_new_tokens))
