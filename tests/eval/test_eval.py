"""dsjax.eval against independent references: full-forward log_softmax computed here, hand-computed bits per byte,
a planted uniform model, hand-written source for function extraction, and a cache-free greedy loop here for exact
match."""
import json
import math
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.eval import __main__ as eval_main
from dsjax.eval import completion, multiple_choice, perplexity
from dsjax.model import Transformer
from dsjax import checkpoint
from dsjax.train import loop
from dsjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MMLU_TINY = os.path.join(ROOT, 'tests', 'fixtures', 'mmlu_tiny.jsonl')
TOK = tokenizer_lib.ByteTokenizer()


def small_config():
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py'))
  m = cfg.model
  m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.mlp_dim, m.max_positions = 32, 1, 2, 1, 64, 256
  cfg.data.seq_len, cfg.data.eval_batches, cfg.train.batch_size = 64, 2, 2
  return cfg


@pytest.fixture(scope='module')
def model_and_params():
  cfg = small_config()
  model = Transformer(cfg.model)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(1), tokens, tokens)['params'])
  return cfg, model, params


REF_LEN = 256  # = model.max_positions


def full_logits(model, params, tokens):
  """Logits [len, V] of one row by a full causal forward pass (no cache), jitted at one fixed length: the row is
  right-padded to REF_LEN, which cannot change earlier positions' logits under causal attention."""
  fn = _FORWARD.setdefault(id(model), jax.jit(lambda p, x: model.apply(
      {'params': p}, x, jnp.arange(REF_LEN, dtype=jnp.int32)[None])[0]))
  x = np.zeros((1, REF_LEN), np.int32)
  x[0, :len(tokens)] = tokens
  return np.asarray(fn(params, x)[0, :len(tokens)], np.float32)


_FORWARD = {}


def full_log_probs(model, params, tokens):
  """log p(token t+1 | tokens <= t) for one row, from jax.nn.log_softmax of a full forward pass: [len - 1]."""
  log_p = np.asarray(jax.nn.log_softmax(full_logits(model, params, tokens[:-1]), axis=-1))
  return log_p[np.arange(len(tokens) - 1), np.asarray(tokens[1:])]


# ---------------------------------------------------------------------------------------------- multiple choice

def test_fixture_parses_letters_and_indices():
  questions = multiple_choice.load_jsonl(MMLU_TINY)
  assert len(questions) == 8
  assert [q.answer for q in questions] == [0, 1, 2, 3, 1, 0, 3, 1]
  assert questions[1].choices[1] == 'def' and questions[0].subject == 'python'


def test_choice_log_likelihood_matches_a_full_forward(model_and_params):
  _, model, params = model_and_params
  questions = multiple_choice.load_jsonl(MMLU_TINY)[:3]
  scores = multiple_choice.choice_log_likelihoods(model, params, TOK, questions, batch_size=4)
  for q, per_choice in zip(questions, scores):
    for choice, (total, count) in zip(q.choices, per_choice):
      context = [TOK.bos_id] + list(f'Question: {q.question}\nAnswer:'.encode())
      continuation = list(f' {choice}'.encode())
      log_p = full_log_probs(model, params, context + continuation)
      assert count == len(continuation)
      np.testing.assert_allclose(total, log_p[-len(continuation):].sum(), rtol=1e-4, atol=1e-4)


def test_planted_uniform_model_prefers_the_shortest_choice(model_and_params):
  cfg, model, params = model_and_params
  # final_norm scale 0: every logit is 0, so each token has probability 1/vocab_size and a choice's log-likelihood is
  # -len(" choice") * ln(vocab_size): the shortest choice wins on the sum; the per-token mean ties (first wins).
  uniform = jax.tree_util.tree_map(lambda x: x, params)
  uniform['final_norm']['scale'] = jnp.zeros_like(params['final_norm']['scale'])
  questions = multiple_choice.load_jsonl(MMLU_TINY)
  scores = multiple_choice.choice_log_likelihoods(model, uniform, TOK, questions)
  for q, per_choice in zip(questions, scores):
    for choice, (total, _) in zip(q.choices, per_choice):
      assert total == pytest.approx(-len(f' {choice}'.encode()) * math.log(cfg.model.vocab_size), rel=1e-5)
  result = multiple_choice.evaluate(model, uniform, TOK, questions)
  shortest = [min(range(len(q.choices)), key=lambda i: (len(q.choices[i].encode()), i)) for q in questions]
  assert result['predictions'] == shortest
  assert result['accuracy'] == pytest.approx(np.mean([s == q.answer for s, q in zip(shortest, questions)]))
  assert result['accuracy_norm'] == pytest.approx(np.mean([q.answer == 0 for q in questions]))
  assert set(result['by_subject']) == {'python', 'arithmetic', 'geography', 'computer science', 'physics'}


@pytest.mark.parametrize('line, why', [
    ('{"question": "q", "choices": ["a", "b"]}', "missing field 'answer'"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', 'at least 2'),
    ('{"question": "q", "choices": ["a", "b"], "answer": "C"}', 'out of range'),
    ('{"question": "q", "choices": ["a", "b"], "answer": 1.5}', 'index or a letter'),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', 'not valid JSON'),
])
def test_malformed_record_names_file_and_line(tmp_path, line, why):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n\n' + line + '\n')
  with pytest.raises(multiple_choice.FormatError, match=rf'bad\.jsonl:3: .*{why}'):
    multiple_choice.load_jsonl(str(path))


# ---------------------------------------------------------------------------------------------- perplexity

def test_bits_per_byte_matches_a_hand_computation(model_and_params):
  cfg, model, params = model_and_params
  batches = pipeline.eval_batches(cfg.data, TOK, cfg.train.batch_size)
  result = perplexity.evaluate(cfg, params, model=model, tokenizer=TOK)
  nll = tokens = num_bytes = 0.0
  for b in batches:
    logits, _ = model.apply({'params': params}, b['inputs'], b['positions'], segment_ids=b['segment_ids'])
    log_p = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    picked = np.take_along_axis(log_p, b['targets'][..., None], axis=-1)[..., 0]
    mask = b['segment_ids'] > 0
    nll -= picked[mask].sum()
    tokens += mask.sum()
    num_bytes += (b['targets'][mask] < 256).sum()  # byte tokens are one byte; bos/eos/pad none
  assert result['tokens'] == tokens and result['bytes'] == num_bytes and result['batches'] == 2
  assert result['loss'] == pytest.approx(nll / tokens, rel=1e-5)
  assert result['bits_per_byte'] == pytest.approx(nll / math.log(2) / num_bytes, rel=1e-5)


# ---------------------------------------------------------------------------------------------- completion

SOURCE = '''"""Module docstring."""
import os


def add(a, b):
  """Adds."""
  total = a + b
  return total


def one_liner(): return 1


@decorator
def multi(
    x,
    y):
  return x * y


class Box:
  def get(self):
    return self.value

  def only_doc(self):
    """Nothing else."""

  def nested(self):
    def inner():
      return 2
    return inner
'''


def test_extract_functions_from_hand_written_source():
  examples = completion.extract_functions(SOURCE, 'm.py', target_lines=1)
  assert [e.name for e in examples] == ['m.py:add', 'm.py:multi', 'm.py:Box.get', 'm.py:Box.nested']
  lines = SOURCE.split('\n')
  add, multi, get, nested = examples
  assert add.prompt == '\n'.join(lines[:6]) + '\n' and add.prompt.endswith('  """Adds."""\n')
  assert add.target == '  total = a + b'
  assert multi.prompt.endswith('    y):\n') and multi.target == '  return x * y'
  assert get.prompt.endswith('  def get(self):\n') and get.target == '    return self.value'
  assert nested.target == '    def inner():'
  two = completion.extract_functions(SOURCE, 'm.py', target_lines=2)
  assert two[0].target == '  total = a + b\n  return total'
  assert two[2].target == '    return self.value'  # never past the function's last line
  no_doc = completion.extract_functions(SOURCE, 'm.py', include_docstring=False)
  assert no_doc[0].target == '  """Adds."""' and no_doc[0].prompt.endswith('def add(a, b):\n')
  assert 'm.py:Box.only_doc' in [e.name for e in no_doc]
  assert completion.extract_functions('def broken(:\n', 'x.py') == []


def reference_greedy(model, params, prompt, num_tokens):
  """Greedy continuation by repeated full forward passes (no KV cache, no Sampler)."""
  tokens = [TOK.bos_id] + list(prompt.encode())
  for _ in range(num_tokens):
    logits = full_logits(model, params, tokens)[-1, :TOK.vocab_size]
    nxt = int(np.argmax(logits))
    if nxt == TOK.eos_id:
      break
    tokens.append(nxt)
  return TOK.decode(tokens[len(prompt.encode()) + 1:])


def test_exact_match_is_one_for_the_models_own_greedy_output_and_zero_otherwise(model_and_params):
  _, model, params = model_and_params
  budget = 6
  examples = completion.extract_functions(SOURCE, 'm.py')[:3]
  own = [completion.Example(e.name, e.prompt, reference_greedy(model, params, e.prompt, budget)) for e in examples]
  assert all(completion.normalize(e.target, 1) for e in own), own  # non-trivial targets
  result = completion.evaluate(model, params, TOK, own, max_new_tokens=budget, batch_size=3, return_outputs=True)
  assert {k: result[k] for k in ('exact_match', 'matches', 'count', 'edit_similarity')} == {
      'exact_match': 1.0, 'matches': 3, 'count': 3, 'edit_similarity': 1.0}
  wrong = [completion.Example(e.name, e.prompt, e.target + 'x' if e.target.strip() else 'x') for e in own]
  result = completion.evaluate(model, params, TOK, wrong, max_new_tokens=budget, batch_size=3)
  assert result['exact_match'] == 0.0 and result['count'] == 3


def test_edit_similarity_by_hand():
  # 'return x' vs 'return y': 7 of 8 characters match on each side -> 2 * 7 / 16.
  assert completion.edit_similarity('  return x  \nmore', '    return y', 1) == pytest.approx(14 / 16)
  assert completion.edit_similarity('abc', 'xyz', 1) == 0.0
  assert completion.edit_similarity('', '', 1) == 1.0


def test_target_bits_per_byte_is_the_teacher_forced_loss_of_the_target_line(model_and_params):
  _, model, params = model_and_params
  examples = completion.extract_functions(SOURCE, 'm.py')[:3]
  result = completion.evaluate(model, params, TOK, examples, max_new_tokens=4, batch_size=2)
  nats, num_bytes = 0.0, 0
  for ex in examples:
    prompt = [TOK.bos_id] + list(ex.prompt.encode())
    continuation = list((ex.target + '\n').encode())[:4]  # cut to max_new_tokens, as generation is
    nats -= full_log_probs(model, params, prompt + continuation)[-len(continuation):].sum()
    num_bytes += len(continuation)
  assert result['target_bits_per_byte'] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-4)
  # The uniform model: log2(vocab_size) bits for every byte.
  uniform = jax.tree_util.tree_map(lambda x: x, params)
  uniform['final_norm']['scale'] = jnp.zeros_like(params['final_norm']['scale'])
  result = completion.evaluate(model, uniform, TOK, examples, max_new_tokens=64, batch_size=2)
  assert result['target_bits_per_byte'] == pytest.approx(math.log2(model.cfg.vocab_size), rel=1e-5)


def test_normalize_compares_first_lines_stripped():
  assert completion.normalize('  return x  \n  more', 1) == 'return x'
  assert completion.normalize('a \nb\nc', 2) == 'a\nb'


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_on_a_saved_checkpoint(tmp_path, model_and_params, capsys):
  cfg, _, params = model_and_params
  ckpt = str(tmp_path / 'ckpt')
  checkpoint.save_model(ckpt, cfg, params)
  out = str(tmp_path / 'eval.json')
  assert eval_main.main([f'--checkpoint={ckpt}', '--tasks=perplexity,mc', f'--mc_file={MMLU_TINY}',
                         f'--out={out}']) == 0
  results = json.load(open(out))['results']
  direct = perplexity.evaluate(cfg, params)
  assert results['perplexity']['bits_per_byte'] == pytest.approx(direct['bits_per_byte'], rel=1e-5)
  assert results['mc']['count'] == 8 and 0.0 <= results['mc']['accuracy'] <= 1.0
  assert 'bits_per_byte' in capsys.readouterr().out
  assert eval_main.main([f'--checkpoint={ckpt}', '--tasks=mc']) == 2
  assert 'mc_file' in capsys.readouterr().err
  assert eval_main.main([f'--checkpoint={ckpt}', '--tasks=bleu']) == 2
  assert "unknown eval task 'bleu'" in capsys.readouterr().err
