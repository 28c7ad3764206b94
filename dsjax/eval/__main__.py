"""Evaluate a saved dsjax checkpoint: `python -m dsjax.eval --checkpoint=DIR --tasks=perplexity,completion,mc
--mc_file=FILE.jsonl [--out=results.json]`; prints a table and writes the results as JSON."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from dsjax import checkpoint
from dsjax import config as config_lib
from dsjax import eval as eval_lib
from dsjax.eval import multiple_choice


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dsjax.eval', description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', required=True, help='a dsjax model checkpoint directory (<workdir>/checkpoint)')
  parser.add_argument('--tasks', default='perplexity', help='comma-separated: perplexity, completion, mc')
  parser.add_argument('--mc_file', default='', help='MMLU-format JSONL for the mc task')
  parser.add_argument('--out', default='', help='results JSON (default: <checkpoint>/eval.json)')
  parser.add_argument('--eval_batches', type=int, default=0, help='perplexity: held-out batches (0: the config\'s)')
  parser.add_argument('--batch_size', type=int, default=0, help='perplexity: rows per batch (0: the config\'s)')
  parser.add_argument('--data_source', default='', help='held-out data source (default: the checkpoint config\'s)')
  parser.add_argument('--completion_examples', type=int, default=200, help='completion: held-out functions')
  parser.add_argument('--completion_lines', type=int, default=1, help='completion: body lines to match')
  parser.add_argument('--max_new_tokens', type=int, default=64, help='completion: tokens generated per function')
  args = parser.parse_args(argv)

  try:
    tasks = eval_lib.parse_tasks(args.tasks)
    cfg = checkpoint.load_config(args.checkpoint)
    if args.eval_batches:
      cfg.data.eval_batches = args.eval_batches
    if args.batch_size:
      cfg.train.batch_size = args.batch_size
    if args.data_source:
      cfg.data.source = args.data_source
    params = checkpoint.load_params(args.checkpoint, cfg.model)
    results = eval_lib.run_tasks(cfg, params, tasks, mc_file=args.mc_file,
                                 completion_examples=args.completion_examples,
                                 completion_lines=args.completion_lines, max_new_tokens=args.max_new_tokens)
  except (ValueError, FileNotFoundError, config_lib.ConfigError, multiple_choice.FormatError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(eval_lib.format_table(results))
  out = args.out or os.path.join(os.path.abspath(args.checkpoint), 'eval.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, 'w') as f:
    json.dump({'checkpoint': os.path.abspath(args.checkpoint), 'results': results}, f, indent=2)
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
