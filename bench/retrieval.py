"""Retrieval-augmented completion (dsjax/retrieval): held-out exact match without and with retrieval, per index kind
and k, side by side on the same examples with the same model and decoding settings.

  python bench/retrieval.py --checkpoint=CKPT [--kinds=bm25,dense,hybrid] [--ks=1,2,4] [--max_examples=200]
                            [--context=0] [--out=bench/results/retrieval_cpu_DATE.json]

The examples are the held-out functions of the checkpoint's data source (dsjax/eval/completion.py: prompt = the
file up to the end of a function's header and docstring, target = the body's first line, greedy, exact match after
stripping), with two softer scores: edit similarity and the target line's teacher-forced bits per byte
(completion.py's module doc). Each index holds the snippets of the train split only, duplicates dropped before the split
(`python -m dsjax.retrieval build`'s defaults); dense and hybrid embed with the checkpoint itself. The baseline
without retrieval is decoded once; each (kind, k) row decodes the augmented prompts. `target in hits` is the share
of examples whose target line appears verbatim in a retrieved snippet: the most that copying could give.

`--kinds=bm25-leaky` is a control, never a result: a BM25 index over all documents, the held-out files included, so
retrieval usually returns the very function being completed. It shows how much the model gains when the answer is
in its prompt, i.e. whether it can copy from retrieved text at all.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.attention import write_results  # pylint: disable=g-import-not-at-top
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.eval import completion
from dsjax.model import Transformer
from dsjax.retrieval import dense
from dsjax.retrieval import evaluate as evaluate_lib
from dsjax.retrieval.index import build_from_source
from dsjax import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEAKY = 'bm25-leaky'  # a control: BM25 over every document, held-out ones included
KINDS = ('bm25', 'dense', 'hybrid', LEAKY)


def parse_args(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True, help='a dsjax checkpoint (e.g. runs/tiny/checkpoint)')
  p.add_argument('--kinds', default='bm25,dense,hybrid')
  p.add_argument('--ks', default='1,2,4')
  p.add_argument('--max_examples', type=int, default=200)
  p.add_argument('--max_new_tokens', type=int, default=64)
  p.add_argument('--context', type=int, default=0, help='tokens of context (0: the trained data.seq_len)')
  p.add_argument('--max_snippets', type=int, default=0, help='index at most this many snippets (0: all; a smoke test)')
  p.add_argument('--embed_tokens', type=int, default=256, help='dense: tokens embedded per snippet')
  p.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results',
                                               f'retrieval_cpu_{datetime.date.today().isoformat()}.json'))
  return p.parse_args(argv)


class MemoEmbedder:
  """An Embedder that embeds each distinct text once, so the dense and hybrid indexes of one run share vectors."""

  def __init__(self, embedder: dense.Embedder):
    self.embedder, self.max_tokens, self._memo = embedder, embedder.max_tokens, {}

  def __call__(self, texts):
    todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
    if todo:
      self._memo.update(zip(todo, self.embedder(todo)))
    return np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, self.embedder.dim), np.float32)


def row(kind: str, k: int, scores: dict, extra: dict, start: float) -> dict:
  """One table row: completion.evaluate's `scores` plus the retrieval figures of `extra`."""
  return dict(index=kind, k=k, exact_match=scores['exact_match'], matches=scores['matches'], count=scores['count'],
              edit_similarity=scores['edit_similarity'], target_bits_per_byte=scores['target_bits_per_byte'],
              delta=extra['delta'], target_in_hits=extra['target_in_hits'],
              retrieved_chars=extra['mean_retrieved_chars'], seconds=time.perf_counter() - start)


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  kinds = [k for k in args.kinds.split(',') if k]
  ks = [int(k) for k in args.ks.split(',') if k]
  cfg = checkpoint.load_config(args.checkpoint)
  params = checkpoint.load_params(args.checkpoint, cfg.model)
  model, tokenizer = Transformer(cfg.model), tokenizer_lib.from_config(cfg.data)
  context = args.context or min(int(cfg.data.seq_len), int(cfg.model.max_positions))
  settings = evaluate_lib.plain_settings(model, context=context, max_new_tokens=args.max_new_tokens)
  examples = completion.held_out_examples(cfg.data, max_examples=args.max_examples)
  print(f'{len(examples)} held-out functions of {cfg.data.source!r}; context {context} tokens, prompts <= '
        f'{settings["max_prompt_tokens"]}')

  start = time.perf_counter()
  baseline = completion.evaluate(model, params, tokenizer, examples, **settings)
  rows = [row('none', 0, baseline, dict(delta=0.0, target_in_hits=0.0, mean_retrieved_chars=0.0), start)]
  embedder = None
  for kind in kinds:
    start = time.perf_counter()
    if kind not in KINDS:
      raise SystemExit(f'error: --kinds: unknown kind {kind!r} (one of {", ".join(KINDS)})')
    if kind in ('dense', 'hybrid') and embedder is None:
      embedder = MemoEmbedder(dense.Embedder(model, params, tokenizer, max_tokens=args.embed_tokens))
    index = build_from_source(cfg.data, 'all' if kind == LEAKY else 'train', 'bm25' if kind == LEAKY else kind,
                              embedder=embedder if kind in ('dense', 'hybrid') else None,
                              model_info=dense.model_info(cfg.model, tokenizer, os.path.abspath(args.checkpoint)),
                              max_snippets=args.max_snippets or None)
    print(f'{kind}: indexed {len(index)} snippets in {time.perf_counter() - start:.0f} s')
    for k in ks:
      start = time.perf_counter()
      r = evaluate_lib.evaluate_with_retrieval(model, params, tokenizer, examples, index, k=k, context=context,
                                               max_new_tokens=args.max_new_tokens, baseline=baseline)
      rows.append(row(kind, k, r['with_retrieval'], r, start))
      print(f'  k={k}: exact match {rows[-1]["exact_match"]:.4f}, target bits/byte '
            f'{rows[-1]["target_bits_per_byte"]:.3f} (without retrieval {rows[0]["exact_match"]:.4f}, '
            f'{rows[0]["target_bits_per_byte"]:.3f})')

  header = ('index', 'k', 'exact match', 'matches', 'edit similarity', 'target bits/byte', 'target in hits',
            'retrieved chars', 's')
  print('\n| ' + ' | '.join(header) + ' |\n|' + '---|' * len(header))
  for r in rows:
    print(f'| {r["index"]} | {r["k"] or "-"} | {r["exact_match"]:.4f} | {r["matches"]}/{r["count"]} | '
          f'{r["edit_similarity"]:.4f} | {r["target_bits_per_byte"]:.3f} | {r["target_in_hits"]:.1%} | '
          f'{r["retrieved_chars"]:.0f} | {r["seconds"]:.0f} |')
  write_results(args.out, rows, checkpoint=os.path.abspath(args.checkpoint), source=cfg.data.source,
                context=context, max_prompt_tokens=settings['max_prompt_tokens'],
                max_new_tokens=args.max_new_tokens, backend=jax.default_backend())
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main(sys.argv[1:])
