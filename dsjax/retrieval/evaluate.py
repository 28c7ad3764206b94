"""Exact match on held-out functions with and without retrieval (dsjax/eval/completion.py's task).

The examples come from the validation split; the index should hold the train split only (checked when both come
from the same source). For each example the query is the prompt's last `query_lines` lines; its top-k snippets
are prepended to the prompt. Both prompt sets must fit `max_prompt_tokens` = what the context leaves after
`max_new_tokens` (as in `completion.evaluate_held_out`): the retrieved text may take up to `retrieval_fraction` of
that budget (more when the local prompt is short), and the local prompt gives up its oldest whole lines to make
room, so its tail, the function header and docstring, is always kept. Without retrieval the prompt keeps the
whole budget. Both runs decode greedily with the same settings.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from dsjax.eval import completion
from dsjax.retrieval import prompt as prompt_lib
from dsjax.retrieval.index import Hit, RetrievalIndex
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer


def augmented_examples(examples: Sequence[completion.Example], index: RetrievalIndex, tokenizer: Any, *, k: int,
                       max_prompt_tokens: int, query_lines: int = prompt_lib.DEFAULT_QUERY_LINES,
                       retrieval_fraction: float = 0.5, max_chars: int | None = None,
                       ) -> tuple[list[completion.Example], list[list[Hit]], list[int]]:
  """The examples with retrieval-augmented prompts of at most `max_prompt_tokens` tokens (bos included), each
  one's hits, and how many characters of retrieved text each prompt got."""
  if not 0.0 < retrieval_fraction < 1.0:
    raise ValueError(f'retrieval_fraction must be in (0, 1), got {retrieval_fraction}')
  budget = max_prompt_tokens - 1  # tokens after bos
  out, all_hits, retrieved = [], [], []
  for ex in examples:
    hits = index.search(prompt_lib.build_query(ex.prompt, query_lines), k)
    context = prompt_lib.augment_prompt('', hits, max_chars if max_chars is not None else 10**9)
    wanted = len(tokenizer.encode(context)) if context else 0
    local_tokens = len(tokenizer.encode(ex.prompt))
    retrieval_room = min(wanted, max(int(budget * retrieval_fraction), budget - local_tokens))
    local = prompt_lib.keep_last_lines(ex.prompt, tokenizer, max(1, budget - retrieval_room))
    augmented = prompt_lib.fit_augmented(local, hits, tokenizer, max_prompt_tokens, max_chars=max_chars)
    out.append(dataclasses.replace(ex, prompt=augmented))
    all_hits.append(hits)
    retrieved.append(len(augmented) - len(local))
  return out, all_hits, retrieved


def plain_settings(model: Any, *, context: int | None = None, max_new_tokens: int = 64, target_lines: int = 1,
                   batch_size: int = 8) -> dict[str, Any]:
  """The keyword arguments of `completion.evaluate` that both runs share: the prompt budget is what `context`
  (default model.cfg.max_positions) leaves after `max_new_tokens`, at least half of it."""
  context = int(context or model.cfg.max_positions)
  max_prompt_tokens = completion.prompt_budget(context, max_new_tokens)
  if max_prompt_tokens < 2:
    raise ValueError(f'context {context} leaves no room for a prompt after max_new_tokens={max_new_tokens}')
  return dict(target_lines=target_lines, max_new_tokens=max_new_tokens, max_prompt_tokens=max_prompt_tokens,
              batch_size=batch_size)


def evaluate_with_retrieval(model: Any, params: Any, tokenizer: Any, examples: Sequence[completion.Example],
                            index: RetrievalIndex, *, k: int = 2, context: int | None = None,
                            max_new_tokens: int = 64, target_lines: int = 1,
                            query_lines: int = prompt_lib.DEFAULT_QUERY_LINES, retrieval_fraction: float = 0.5,
                            max_chars: int | None = None, batch_size: int = 8,
                            baseline: dict[str, Any] | None = None) -> dict[str, Any]:
  """Greedy exact match of `examples` without and with retrieval; `context` defaults to model.cfg.max_positions.
  `baseline`: the without-retrieval result of these examples and settings, when already computed (a sweep over
  indexes and k computes it once).

  Returns {'without_retrieval': {...}, 'with_retrieval': {...}} (completion.evaluate's results: exact match, edit
  similarity, target bits per byte), 'delta' (exact match with minus without), 'count', 'k', 'mean_hits',
  'mean_retrieved_chars' and 'target_in_hits' (the fraction of examples whose normalized target appears in a hit:
  how often retrieval could have helped by copying).
  """
  settings = plain_settings(model, context=context, max_new_tokens=max_new_tokens, target_lines=target_lines,
                            batch_size=batch_size)
  max_prompt_tokens = settings['max_prompt_tokens']
  augmented, hits, retrieved = augmented_examples(examples, index, tokenizer, k=k, max_prompt_tokens=max_prompt_tokens,
                                       query_lines=query_lines, retrieval_fraction=retrieval_fraction,
                                       max_chars=max_chars)
  without = baseline if baseline is not None else completion.evaluate(model, params, tokenizer, examples, **settings)
  with_ = completion.evaluate(model, params, tokenizer, augmented, **settings)
  count = len(examples)
  in_hits = [any(completion.normalize(ex.target, target_lines) in h.text for h in hs) for ex, hs in zip(examples, hits)]
  return {'without_retrieval': without, 'with_retrieval': with_,
          'delta': with_['exact_match'] - without['exact_match'], 'count': count, 'k': k,
          'mean_hits': sum(map(len, hits)) / count if count else 0.0,
          'mean_retrieved_chars': sum(retrieved) / count if count else 0.0,
          'target_in_hits': sum(in_hits) / count if count else 0.0,
          'max_prompt_tokens': max_prompt_tokens}


def check_no_leakage(index: RetrievalIndex, data_cfg: ml_collections.ConfigDict) -> None:
  """ValueError when the index was built from the evaluated source's validation documents (or all of them, or with
  another validation_fraction, which moves documents between the splits)."""
  source = index.manifest.get('source')
  if not isinstance(source, dict) or source.get('source') != data_cfg.source:
    return  # another corpus: nothing to check
  if source.get('split') != 'train':
    raise ValueError(f'the index holds the {source.get("split")!r} split of {data_cfg.source!r}, which includes the '
                     'held-out functions; build it with --split=train')
  if abs(float(source.get('validation_fraction', -1)) - float(data_cfg.validation_fraction)) > 1e-12:
    raise ValueError(f'the index was built with validation_fraction={source.get("validation_fraction")}, the '
                     f'evaluation uses {data_cfg.validation_fraction}: the splits differ, so held-out functions may '
                     'be in the index; rebuild it with the same --validation_fraction')
  if bool(source.get('include_stdlib_tests', False)) != bool(data_cfg.get('include_stdlib_tests', False)):
    raise ValueError('the index and the evaluation differ in include_stdlib_tests; rebuild the index to match')
  if source.get('dedup', 'none') == 'none' and data_cfg.get('dedup', 'none') != 'none':
    raise ValueError('the index was built without dropping duplicates, so near copies of held-out functions may be '
                     f'in it; rebuild it with --dedup={data_cfg.dedup}')


def run(cfg: ml_collections.ConfigDict, params: Any, index: RetrievalIndex, *, model: Any = None, tokenizer: Any = None,
        max_examples: int = 200, **kwargs: Any) -> dict[str, Any]:
  """`evaluate_with_retrieval` on the held-out functions of `cfg.data` (context: the trained one, as
  completion.evaluate_held_out)."""
  check_no_leakage(index, cfg.data)
  tokenizer = tokenizer or tokenizer_lib.from_config(cfg.data)
  model = model or Transformer(cfg.model)
  target_lines = kwargs.get('target_lines', 1)
  examples = completion.held_out_examples(cfg.data, max_examples=max_examples, target_lines=target_lines)
  if not examples:
    raise ValueError(f'no held-out functions in the validation split of {cfg.data.source!r}')
  context = min(int(cfg.data.seq_len), int(cfg.model.max_positions))
  return evaluate_with_retrieval(model, params, tokenizer, examples, index, context=context, **kwargs)


def format_table(results: dict[str, Any]) -> str:
  """The results as a small text table."""
  rows = [('', 'exact match', 'matches', 'examples', 'edit sim.', 'target bits/byte')]
  for label, key in (('without retrieval', 'without_retrieval'), (f'with retrieval (k={results["k"]})',
                                                                  'with_retrieval')):
    r = results[key]
    rows.append((label, f'{r["exact_match"]:.4f}', str(r['matches']), str(r['count']),
                 f'{r["edit_similarity"]:.4f}', f'{r["target_bits_per_byte"]:.3f}'))
  rows.append(('delta', f'{results["delta"]:+.4f}', '', '', '', ''))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  lines = ['  '.join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
           for row in rows]
  lines.append(f'(target line in a retrieved snippet: {results["target_in_hits"]:.1%} of examples; '
               f'{results["mean_retrieved_chars"]:.0f} retrieved characters per prompt)')
  return '\n'.join(lines)
