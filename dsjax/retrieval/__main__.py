"""Retrieval index CLI:

  python -m dsjax.retrieval build --source=stdlib|DIR|FILE.jsonl --split=train|validation|all --out=DIR
      --kind=bm25|dense|hybrid [--checkpoint=CKPT (dense, hybrid)] [--max_snippets=N --max_chars=1500]
  python -m dsjax.retrieval search --index=DIR [--k=5 --checkpoint=CKPT] "query text"
  python -m dsjax.retrieval evaluate --checkpoint=CKPT --index=DIR [--k=2 --max_examples=200 --out=results.json]

Errors (a missing checkpoint or index, a bad source) print one `error: ...` line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from dsjax.retrieval import snippets as snippets_lib
from dsjax import checkpoint
from dsjax import cli
from dsjax import config as config_lib
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.model import Transformer
from dsjax.retrieval import dense
from dsjax.retrieval import evaluate as evaluate_lib
from dsjax.retrieval.index import RetrievalIndex
from dsjax.retrieval.index import build_from_source


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m dsjax.retrieval', description=__doc__.split('\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  b = sub.add_parser('build', help='index the snippets of a source')
  b.add_argument('--source', default='stdlib', help="'stdlib', a directory, a .txt/.py file or a .jsonl file")
  b.add_argument('--split', default='train', choices=('train', 'validation', 'all'))
  b.add_argument('--validation_fraction', type=float, default=0.05, help='as data.validation_fraction')
  b.add_argument('--include_stdlib_tests', action='store_true')
  b.add_argument('--jsonl_field', default='text')
  b.add_argument('--dedup', default='near', choices=('none', 'exact', 'near'),
                 help='as data.dedup: duplicates are dropped before the split, as training does, so no near copy of '
                 'a held-out document lands in a train-split index')
  b.add_argument('--out', required=True, help='index directory to write (replaced atomically)')
  b.add_argument('--kind', default='bm25', choices=('bm25', 'dense', 'hybrid'))
  b.add_argument('--checkpoint', default='', help='dense/hybrid: the checkpoint whose hidden states embed')
  b.add_argument('--max_snippets', type=int, default=0, help='index at most this many snippets (0: all)')
  b.add_argument('--max_chars', type=int, default=snippets_lib.DEFAULT_MAX_CHARS, help='characters per snippet')
  b.add_argument('--window_lines', type=int, default=snippets_lib.DEFAULT_WINDOW_LINES,
                 help='lines per snippet of text that is not Python')
  b.add_argument('--max_tokens', type=int, default=256, help='dense: tokens embedded per snippet')
  b.add_argument('--batch_size', type=int, default=16, help='dense: snippets per forward pass')
  s = sub.add_parser('search', help='print the best snippets for a query')
  s.add_argument('--index', required=True)
  s.add_argument('--k', type=int, default=5)
  s.add_argument('--checkpoint', default='', help='dense/hybrid indexes: the checkpoint that built them')
  s.add_argument('--lines', type=int, default=8, help='lines of each snippet to print')
  s.add_argument('query')
  e = sub.add_parser('evaluate', help='held-out exact match with and without retrieval')
  e.add_argument('--checkpoint', required=True)
  e.add_argument('--index', required=True, help='built on the train split of the checkpoint\'s data source')
  e.add_argument('--k', type=int, default=2)
  e.add_argument('--max_examples', type=int, default=200)
  e.add_argument('--target_lines', type=int, default=1)
  e.add_argument('--max_new_tokens', type=int, default=64)
  e.add_argument('--query_lines', type=int, default=10, help='query = the prompt\'s last lines')
  e.add_argument('--retrieval_fraction', type=float, default=0.5, help='of the prompt budget for retrieved text')
  e.add_argument('--max_chars', type=int, default=0, help='retrieved characters per prompt (0: no cap)')
  e.add_argument('--batch_size', type=int, default=8)
  e.add_argument('--data_source', default='', help='held-out data source (default: the checkpoint config\'s)')
  e.add_argument('--out', default='', help='write the results as JSON here')
  return p


def _load_checkpoint(directory: str) -> tuple[Any, Any, Any, Any]:
  """(cfg, model, params, tokenizer) of a checkpoint directory."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint {directory!r} not found')
  cfg = checkpoint.load_config(directory)
  params = checkpoint.load_params(directory, cfg.model)
  return cfg, Transformer(cfg.model), params, tokenizer_lib.from_config(cfg.data)


def build(args: argparse.Namespace) -> None:
  embedder = info = None
  if args.kind != 'bm25':
    if not args.checkpoint:
      raise ValueError(f'--kind={args.kind} embeds with a model: pass --checkpoint=CKPT')
    cfg, model, params, tokenizer = _load_checkpoint(args.checkpoint)
    embedder = dense.Embedder(model, params, tokenizer, max_tokens=args.max_tokens, batch_size=args.batch_size)
    info = dense.model_info(cfg.model, tokenizer, os.path.abspath(args.checkpoint))
  data_cfg = ml_collections.ConfigDict(dict(source=args.source, include_stdlib_tests=args.include_stdlib_tests,
                                            jsonl_field=args.jsonl_field, validation_fraction=args.validation_fraction,
                                            dedup=args.dedup))
  index = build_from_source(data_cfg, args.split, args.kind, embedder=embedder, model_info=info,
                            max_chars=args.max_chars, window_lines=args.window_lines,
                            max_snippets=args.max_snippets or None)
  index.save(args.out)
  source = index.manifest['source']
  print(f'indexed {len(index)} snippets of {source["documents"]} documents ({source["description"]}) as '
        f'{args.kind} -> {args.out}')


def _load_index(path: str, checkpoint: str) -> Any:
  if checkpoint:
    _, model, params, tokenizer = _load_checkpoint(checkpoint)
    return RetrievalIndex.load(path, model=model, params=params, tokenizer=tokenizer)
  return RetrievalIndex.load(path)


def search(args: argparse.Namespace) -> None:
  index = _load_index(args.index, args.checkpoint)
  for rank, hit in enumerate(index.search(args.query, args.k), 1):
    print(f'{rank}. {hit.name}  (score {hit.score:.4f})')
    for line in hit.text.split('\n')[:args.lines]:
      print(f'     {line}')


def evaluate(args: argparse.Namespace) -> None:
  cfg, model, params, tokenizer = _load_checkpoint(args.checkpoint)
  if args.data_source:
    cfg.data.source = args.data_source
  index = RetrievalIndex.load(args.index, model=model, params=params, tokenizer=tokenizer)
  results = evaluate_lib.run(cfg, params, index, model=model, tokenizer=tokenizer, max_examples=args.max_examples,
                             k=args.k, target_lines=args.target_lines, max_new_tokens=args.max_new_tokens,
                             query_lines=args.query_lines, retrieval_fraction=args.retrieval_fraction,
                             max_chars=args.max_chars or None, batch_size=args.batch_size)
  print(evaluate_lib.format_table(results))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump({'checkpoint': os.path.abspath(args.checkpoint), 'index': os.path.abspath(args.index),
                 'index_manifest': {k: v for k, v in index.manifest.items() if k != 'dense'}, 'results': results},
                f, indent=2)
    print(f'wrote {args.out}')


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  logging.getLogger('bm25s').setLevel(logging.WARNING)  # its per-call DEBUG/INFO lines
  try:
    {'build': build, 'search': search, 'evaluate': evaluate}[args.command](args)
  except (FileNotFoundError, ValueError, config_lib.ConfigError) as e:
    cli.fail(str(e))
  return 0


if __name__ == '__main__':
  sys.exit(main())
