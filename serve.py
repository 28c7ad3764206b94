"""An OpenAI-compatible HTTP server for a dsjax checkpoint, over the continuous-batching engine:

  python serve.py --checkpoint=DIR [--port=8000 --num_slots=8 --max_len=1024 --api_key=KEY --quant=int8|int4]

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with stream=true as server-sent events),
GET /v1/models, GET /health. Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}.
Sampling: temperature, top_p, top_k (an extension), seed, stop (strings), max_tokens; n must be 1.
Output safety filter (off by default): --safety_config=FILE.json, a JSON object with any of the keys blocklist
(words/phrases: whole-word, case-insensitive), patterns (regexes), classifier ("package.module:function", a hook
text -> score in [0, 1] or bool), classifier_threshold, classifier_chars, action ("refuse" | "redact"),
refusal_message, redaction, apply_to (default ["chat"]; add "completion"), max_match_chars; see docs/safety.md.
Retrieval-augmented completion (off by default): --retrieval_index=NAME=DIR (repeatable) loads indexes built with
`python -m dsjax.retrieval build`; a /v1/completions request may then add the non-standard body field
`"retrieval": {"index": NAME, "k": INT}` (k in [1, 20], default 2; text prompts only): the index's top k snippets for
the prompt's last lines are prepended to the prompt as `# Retrieved from FILE:QUALNAME:` blocks, as many as leave
room for max_tokens, and usage.prompt_tokens counts the augmented prompt. Dense and hybrid indexes embed queries
with the served model, which must be the one that built them (checked at start-up).
Limits (docs/serving.md): --max_body_bytes, --max_json_depth, --max_prompt_chars, --max_prompt_tokens,
--max_messages, --max_stop, --max_stop_chars, --request_timeout; a request past one gets a 4xx JSON error naming it.
--port=0 picks a free port; the "serving ... http://HOST:PORT/v1" line is printed once the socket listens, with the
port actually bound. /health answers 503 once the engine cannot serve (its thread ended, or a device call has run
past --stall_timeout); if the engine gives up after repeated failures the process exits with status 1, for a
supervisor to restart it.
The app itself is dsjax/serve/api.py (`create_app`); this file is the command line.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import sys
import threading
from typing import Any

from absl import app as absl_app
from absl import flags

from dsjax import cli
from dsjax.sample import paged_engine
from dsjax.serve.api import create_app
from dsjax.serve import limits as limits_lib
from dsjax.serve.chat import read_chat_template
from dsjax.serve.safety import load_safety_config

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'dsjax checkpoint directory.')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on (1-65535; 0: a free one, printed at start-up).')
_API_KEY = flags.DEFINE_string('api_key', '', 'Bearer token clients must send; empty: no authentication.')
_ENGINE = flags.DEFINE_enum('engine', 'paged', ['paged', 'slots'], 'paged: a pool of KV blocks shared by all '
                            'requests (prefix caching, chunked prefill, preemption); slots: --num_slots fixed rows of '
                            'max_len (needed by --draft=mtp).')
_NUM_SLOTS = flags.DEFINE_integer('num_slots', 8, 'slots: concurrent requests (rows of the batch KV cache); paged: '
                                  'the default KV memory (--kv_blocks=0 gives the pool the memory of this many '
                                  'slots).')
_KV_BLOCKS = flags.DEFINE_integer('kv_blocks', 0, 'paged: KV blocks in the pool (0: the memory of --num_slots '
                                  'slots).')
_BLOCK_SIZE = flags.DEFINE_integer('block_size', 16, 'paged: tokens per KV block.')
_MAX_RUNNING = flags.DEFINE_integer('max_running', 64, 'paged: requests running at once at most (memory allowing).')
_PREFILL_BUDGET = flags.DEFINE_integer('prefill_budget', 512, 'paged: prompt tokens prefilled per engine step (a '
                                       'long prompt delays running requests by one such chunk per step).')
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Context length, prompt + completion (0: model.max_positions).')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 64, 'Requests waiting for a slot before 429s.')
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'Model id of the API (default: the checkpoint dir name).')
_DRAIN_TIMEOUT = flags.DEFINE_float('drain_timeout', 10.0, 'On SIGTERM, seconds to finish in-flight requests.')
_MODEL_FLAGS = cli.define_model_flags()  # --dtype, --quant, --quant_group_size, --quant_activations, --adapter
_DRAFT = flags.DEFINE_string('draft', '', 'Speculative decoding: "lookup" (n-gram prompt lookup), "mtp" (the '
                             "model's own multi-token-prediction depth) or a draft model checkpoint sharing the "
                             'tokenizer; empty: off.')
_GAMMA = flags.DEFINE_integer('gamma', 4, 'Speculative decoding: tokens drafted per target forward.')
_RETRIEVAL_INDEX = flags.DEFINE_multi_string('retrieval_index', [], 'NAME=DIR: a retrieval index (python -m '
                                             'dsjax.retrieval build) requests may name; repeatable.')
_SAFETY_CONFIG = flags.DEFINE_string('safety_config', '', 'A JSON file configuring the output safety filter (see '
                                     'docs/safety.md); empty: off.')
_LIMIT_HELP = {
    'max_body_bytes': 'Largest request body in bytes (413 beyond).',
    'max_json_depth': 'Deepest JSON nesting a request body may have.',
    'max_prompt_chars': 'Most characters in a prompt, or in all chat messages together.',
    'max_prompt_tokens': 'Most prompt tokens (0: the context, max_len - 1).',
    'max_messages': 'Most messages in a chat request.',
    'max_stop': 'Most stop strings in a request.',
    'max_stop_chars': 'Most characters in one stop string.',
    'request_timeout': 'Seconds a request may take, queued and generating (504 beyond; 0: no limit).',
}
_LIMITS = {field.name: (flags.DEFINE_float if field.type == 'float' else flags.DEFINE_integer)(
    field.name, field.default, _LIMIT_HELP[field.name]) for field in dataclasses.fields(limits_lib.Limits)}
_STALL_TIMEOUT = flags.DEFINE_float('stall_timeout', 300.0, '/health answers 503 once one device call (a prefill or '
                                    'a decode step, first compiles included) has run this many seconds; 0: never.')
_LOG_REQUESTS = flags.DEFINE_bool('log_requests', True, 'Log a line per request (id, tokens, finish reason, time) '
                                  'to stderr.')


def _retrieval_index_paths(specs: list[str]) -> dict[str, str]:
  """--retrieval_index values NAME=DIR -> {NAME: DIR}; a one-line error for a malformed or repeated NAME."""
  paths: dict[str, str] = {}
  for spec in specs or []:
    name, sep, path = spec.partition('=')
    if not sep or not name.strip() or not path:
      cli.fail(f'--retrieval_index must be NAME=DIR, got {spec!r}')
    if name in paths:
      cli.fail(f'--retrieval_index: the name {name!r} is given twice')
    paths[name] = path
  return paths


def _load_retrieval_indexes(paths: dict[str, str], model: Any, params: Any, tokenizer: Any) -> dict[str, Any]:
  """The named indexes; dense ones embed with the served model and must have been built by it (ValueError)."""
  if not paths:
    return {}
  from dsjax.retrieval.index import RetrievalIndex  # pylint: disable=g-import-not-at-top
  indexes = {}
  for name, path in paths.items():
    try:
      indexes[name] = RetrievalIndex.load(path, model=model, params=params, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError) as e:
      raise ValueError(f'--retrieval_index={name}={path}: {e}') from None
  return indexes


def _bind(host: str, port: int) -> socket.socket:
  """A socket bound to host:port (not listening yet, so nothing connects while the model loads); a one-line error
  for a port out of range or already in use."""
  if not 0 <= port <= 65535:
    cli.fail(f'--port={port}: must be in 1-65535 (or 0 for a free port)')
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait for TIME_WAIT
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    cli.fail(f'cannot listen on {host}:{port}: {e.strerror or e}')
  return sock


def _log_requests_to_stderr() -> None:
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
  logger = logging.getLogger('dsjax.serve')
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _CHECKPOINT.value:
    cli.fail('--checkpoint is required')
  try:
    limits = limits_lib.Limits(**{name: holder.value for name, holder in _LIMITS.items()})
  except ValueError as e:
    cli.fail(f'--{e}')
  if _STALL_TIMEOUT.value < 0:
    cli.fail(f'--stall_timeout={_STALL_TIMEOUT.value}: must be >= 0')
  sock = _bind(_HOST.value, _PORT.value)  # before loading: a port in use fails in a second, not after the load
  fatal: list[BaseException] = []
  servers: list[Any] = []

  def on_fatal(error: BaseException) -> None:  # the engine gave up (engine thread): stop serving, then exit 1
    fatal.append(error)
    for server in servers:
      server.should_exit = True
  safety = None
  if _SAFETY_CONFIG.value:
    try:
      safety = load_safety_config(_SAFETY_CONFIG.value)
    except (FileNotFoundError, ValueError) as e:
      cli.fail(f'--safety_config: {e}')
  retrieval_paths = _retrieval_index_paths(_RETRIEVAL_INDEX.value)
  cli.quiet_logging()
  import uvicorn  # pylint: disable=g-import-not-at-top
  from dsjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from dsjax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dsjax.sample import speculative  # pylint: disable=g-import-not-at-top
  try:
    cfg = cli.checkpoint_config(_CHECKPOINT.value, _MODEL_FLAGS)
    config_lib.validate(cfg)
    model, params = cli.load_model(_CHECKPOINT.value, cfg, _MODEL_FLAGS)
    tokenizer = tokenizer_lib.from_config(cfg.data)
    retrieval_indexes = _load_retrieval_indexes(retrieval_paths, model, params, tokenizer)
    max_len = _MAX_LEN.value or int(cfg.model.max_positions)
    drafter = speculative.make_drafter(_DRAFT.value, cfg.model, max_len=max_len, gamma=_GAMMA.value,
                                       target_model=model, target_params=params)
    engine = paged_engine.make_engine(
        _ENGINE.value, model, params, num_slots=_NUM_SLOTS.value, max_len=max_len, kv_blocks=_KV_BLOCKS.value,
        block_size=_BLOCK_SIZE.value, max_running=_MAX_RUNNING.value, prefill_budget=_PREFILL_BUDGET.value,
        max_queue=_MAX_QUEUE.value, vocab_limit=tokenizer.vocab_size, drafter=drafter, gamma=_GAMMA.value,
        on_fatal=on_fatal)
  except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
    cli.fail(str(e))
  model_name = _MODEL_NAME.value or os.path.basename(os.path.normpath(os.path.abspath(_CHECKPOINT.value)))
  if _LOG_REQUESTS.value:
    _log_requests_to_stderr()
  api = create_app(engine, tokenizer, model_name, _API_KEY.value, max_len,
                   chat_template=read_chat_template(_CHECKPOINT.value), shutdown_engine=True,
                   safety=safety, retrieval_indexes=retrieval_indexes, limits=limits,
                   stall_timeout=_STALL_TIMEOUT.value or None)
  server = uvicorn.Server(uvicorn.Config(api, log_level='warning',
                                         timeout_graceful_shutdown=max(1, int(_DRAIN_TIMEOUT.value))))
  servers.append(server)
  server.should_exit = bool(fatal)
  handle_exit = server.handle_exit

  def on_signal(sig: int, frame: Any) -> None:
    # uvicorn stops accepting and waits for open connections; the engine finishes in-flight requests meanwhile
    # and cancels what is left after --drain_timeout, so streams end and nothing hangs.
    handle_exit(sig, frame)
    threading.Thread(target=engine.shutdown, kwargs=dict(cancel=False, timeout=_DRAIN_TIMEOUT.value),
                     daemon=True).start()

  server.handle_exit = on_signal
  sock.listen(2048)  # connections queue from here; uvicorn accepts them once its loop runs
  host, port = sock.getsockname()[:2]
  shown = f'[{host}]' if ':' in host else host
  memory = (f'{_NUM_SLOTS.value} slots' if _ENGINE.value == 'slots' else
            f'{engine.num_blocks} KV blocks of {engine.block_size} tokens, up to {engine.num_slots} running')
  print(f'serving {model_name} on http://{shown}:{port}/v1 ({memory}, '
        f'max_len {max_len}' + (f', speculative: {_DRAFT.value}, gamma {_GAMMA.value}' if drafter else '') + ')',
        flush=True)
  server.run(sockets=[sock])  # returns after SIGTERM/SIGINT once connections are closed (then re-raises the signal)
  engine.shutdown(cancel=True, timeout=5.0)
  if fatal:
    print(f'error: the engine stopped after repeated failures: {fatal[0]}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  absl_app.run(main, flags_parser=cli.parse_flags)
