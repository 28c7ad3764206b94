"""Speculative decoding: greedy-exact against `Sampler.generate`, distribution-exact by a chi-square test against
the enumerated target distribution, and sane acceptance statistics."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

from dsjax import config as config_lib
from dsjax.model import Transformer
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from tests.model import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GAMMA = 3
ALPHA = 1e-3  # chi-square significance level: a correct sampler fails with probability 1e-3 per fixed seed


def tiny_model(kind: str = 'full', *, vocab: int = 40, seed: int = 1, std: float = 0.5, layers: int = 2,
               num_global: int = 1, mtp: bool = False):
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'tiny.py')).model
  cfg.unlock()
  cfg.update(dict(vocab_size=vocab, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2, mlp_dim=48))
  cfg.attention.kind = kind
  cfg.attention.window = 3
  cfg.attention.num_global = num_global
  cfg.mtp.num_layers = int(mtp)  # a multi-token-prediction depth: the MtpDrafter's
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  return model, helpers.random_like(shapes, seed=seed, std=std)


PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 8], [5, 6, 5, 6, 5, 6, 5]]


@pytest.mark.parametrize('kind', ['full', 'sparse'])
def test_greedy_speculative_equals_plain_greedy(kind):
  model, params = tiny_model(kind, mtp=True)
  draft_model, draft_params = tiny_model(kind, seed=7, layers=1)
  target = sampler_lib.Sampler(model, max_len=24, extra_slots=GAMMA + 1)
  plain = lambda stops: target.generate(params, PROMPTS, jax.random.key(0), max_new_tokens=14, temperature=0.0,
                                        stop_ids=stops, vocab_limit=35)
  stops = [plain(())[0][4]]  # row 0 (at least) stops early
  reference = plain(stops)
  assert len(reference[0]) < 14
  drafters = {
      'lookup': speculative.PromptLookupDrafter(),
      'other model': speculative.ModelDrafter(sampler_lib.Sampler(draft_model, max_len=24, extra_slots=GAMMA + 1),
                                              draft_params),
  }
  drafters['mtp'] = speculative.MtpDrafter(model, params, max_len=24, gamma=GAMMA)
  if kind == 'full':  # the target as its own drafter accepts (nearly) everything
    drafters['self'] = speculative.ModelDrafter(target, params)
  for name, drafter in drafters.items():
    got, stats = speculative.speculative_generate(target, params, drafter, PROMPTS, jax.random.key(0),
                                                  max_new_tokens=14, gamma=GAMMA, stop_ids=stops, vocab_limit=35)
    assert got == reference, name
    assert 0.0 <= stats['acceptance_rate'] <= 1.0
    assert 1.0 <= stats['tokens_per_target_step'] <= GAMMA + 1
    if name == 'self':
      assert stats['acceptance_rate'] > 0.9


def test_ring_cache_needs_extra_slots():
  model, params = tiny_model('sparse')
  with pytest.raises(ValueError, match='extra_slots'):
    speculative.speculative_generate(sampler_lib.Sampler(model, max_len=24), params,
                                     speculative.PromptLookupDrafter(), [[1, 2]], jax.random.key(0),
                                     max_new_tokens=4, gamma=GAMMA)


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
  lookup = speculative.PromptLookupDrafter(ngram_max=3)
  assert lookup.lookup(np.array([4, 1, 2, 3, 9, 1, 2]), 3) == [3, 9, 1]
  assert lookup.lookup(np.array([5, 6, 5, 6]), 4) == [5, 6, 5, 6]  # overlapping copy continues the period
  assert lookup.lookup(np.array([1, 2, 3]), 2) == [3, 3]  # no match: repeat the last token


def test_stats_prompt_lookup_accepts_a_lot_on_repetitive_text():
  # One layer of window-3 attention without global tokens: greedy's next token is a function of the last 3 tokens,
  # so once the context repeats a 3-gram, prompt lookup predicts the continuation exactly.
  model, params = tiny_model('sparse', layers=1, num_global=0)
  target = sampler_lib.Sampler(model, max_len=96, extra_slots=GAMMA + 1)
  seed = [3, 4, 5, 6]
  first = target.generate(params, [seed], jax.random.key(0), max_new_tokens=24)[0]
  prompt = seed + first + [9, 9] + seed
  _, stats = speculative.speculative_generate(target, params, speculative.PromptLookupDrafter(), [prompt],
                                              jax.random.key(0), max_new_tokens=24, gamma=GAMMA)
  assert stats['acceptance_rate'] > 0.6, stats
  assert stats['tokens_per_target_step'] > 2.5, stats
  assert stats['target_steps'] < 12


def joint_distribution(model, params, prompt, vocab, settings):
  """Exact probabilities [V, V] of the first two new tokens, by enumerating the first."""
  tokens = jnp.asarray([list(prompt) + [x] for x in range(vocab)], jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  logits, _ = model.apply({'params': params}, tokens, positions)
  first = np.asarray(sampler_lib.token_probs(logits[:1, -2], **settings), np.float64)[0]
  second = np.asarray(sampler_lib.token_probs(logits[:, -1], **settings), np.float64)
  return first[:, None] * second


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  """Goodness of fit of outcome counts to probs (0 if an impossible outcome occurred); cells with expected count
  < 5 pooled into one."""
  counts, probs = counts.ravel().astype(np.float64), probs.ravel() / probs.sum()
  expected = probs * counts.sum()
  if counts[expected == 0].sum() > 0:
    return 0.0
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  expected = np.append(expected[~small], expected[small].sum())
  if expected[-1] == 0:
    observed, expected = observed[:-1], expected[:-1]
  return float(scipy_stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize('settings', [pytest.param(dict(temperature=1.0), marks=pytest.mark.slow),
                                      dict(temperature=0.8, top_k=6, top_p=0.9)])
def test_speculative_samples_follow_the_target_distribution(settings):
  vocab, rows, prompt = 8, 4000, [1, 2, 3, 1, 2]
  model, params = tiny_model(vocab=vocab, seed=1, std=0.6, mtp=True)
  draft_model, draft_params = tiny_model(vocab=vocab, seed=5, std=0.6, layers=1)
  p = joint_distribution(model, params, prompt, vocab, settings)
  q = joint_distribution(draft_model, draft_params, prompt, vocab, settings)
  keys = jax.random.split(jax.random.key(1234), rows)
  target = sampler_lib.Sampler(model, max_len=10)
  drafters = [speculative.ModelDrafter(sampler_lib.Sampler(draft_model, max_len=10), draft_params),
              speculative.PromptLookupDrafter(),  # proposes 3, 1 after "... 1 2"
              speculative.MtpDrafter(model, params, max_len=10, gamma=2)]
  for drafter in drafters:
    got, stats = speculative.speculative_generate(target, params, drafter, [prompt] * rows, keys,
                                                  max_new_tokens=2, gamma=2, **settings)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, tuple(np.asarray(got).T), 1)
    assert chi_square_pvalue(counts, p) > ALPHA, type(drafter).__name__
    assert 0.0 < stats['acceptance_rate'] < 1.0
  # The test has power: the draft model's own samples (what "accept every draft" would output) fail it.
  naive = np.random.default_rng(0).multinomial(rows, q.ravel() / q.sum()).reshape(vocab, vocab)
  assert chi_square_pvalue(naive, p) < ALPHA
