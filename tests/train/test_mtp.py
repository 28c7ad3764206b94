"""Multi-token prediction (DeepSeek-V3 section 2.2): the MTP depths' logits against their definition, and the loss
term against the paper's formula computed directly in numpy (eq. 24-25: depth k at position i predicts token
i + k + 1, averaged over the depths' valid tokens, within documents)."""
import jax
import jax.numpy as jnp
import numpy as np

from dsjax.model import Transformer
from dsjax.model.transformer import Block
from dsjax.train import objective as objective_lib
from tests.model import oracles
from tests.model.helpers import init_shapes, jit, random_like, random_packed, tiny_config


def mtp_config(depths=2):
  m = tiny_config('full')
  m.mtp.num_layers = depths
  return m


def test_mtp_logits_follow_the_definition():
  """h^0 = the final-normed main states; h^k = Block(eh_proj([rmsnorm(emb(t_{i+k})); rmsnorm(h^{k-1})])); logits^k =
  head(rmsnorm_k(h^k))."""
  cfg = mtp_config()
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 10)))
  pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
  params = random_like(init_shapes(model, tokens, pos), seed=1)
  _, aux = jit(model.apply)({'params': params}, tokens, pos)
  f = lambda a: np.asarray(a, np.float64)
  emb = f(params['embedder']['embedding'])
  head = f(params['lm_head']['kernel'])
  h = f(aux['hidden'])
  for k in (1, 2):
    p = params[f'mtp_{k - 1}']
    ahead = np.pad(np.asarray(tokens)[:, k:], ((0, 0), (0, k)))
    joined = np.concatenate([oracles.rmsnorm(emb[ahead], f(p['enorm']['scale']), cfg.norm_eps),
                             oracles.rmsnorm(h, f(p['hnorm']['scale']), cfg.norm_eps)], axis=-1)
    x = jnp.asarray(joined @ f(p['eh_proj']['kernel']), jnp.float32)
    (h_k, _), _ = Block(cfg).apply({'params': p['block']}, (x, None), None, pos, None, None, None, None)
    h = f(h_k)
    want = oracles.rmsnorm(h, f(params[f'mtp_{k - 1}_norm']['scale']), cfg.norm_eps) @ head
    np.testing.assert_allclose(np.asarray(aux['mtp_logits'][k - 1]), want, rtol=1e-4, atol=1e-4)


def test_mtp_loss_term_matches_the_paper_formula():
  cfg = mtp_config()
  rng = np.random.default_rng(3)
  b, t, v = 3, 12, cfg.vocab_size
  pos, seg = random_packed(rng, b, t)
  targets = rng.integers(0, v, (b, t))
  logits = rng.normal(size=(2, b, t, v))
  forward = objective_lib.Forward(jnp.zeros((b, t, v)), {'mtp_logits': jnp.asarray(logits, jnp.float32)},
                                  {'targets': jnp.asarray(targets), 'segment_ids': jnp.asarray(seg)},
                                  jnp.asarray(seg > 0, jnp.float32))
  got = float(objective_lib.multi_token_nll(forward))
  total = 0.0
  for k in (1, 2):
    for row in range(b):
      for i in range(t - k):
        # target of position i + k is token i + k + 1: valid when it is a real token of position i's document
        if seg[row, i + k] > 0 and seg[row, i + k] == seg[row, i]:
          lz = np.log(np.exp(logits[k - 1, row, i] - logits[k - 1, row, i].max()).sum()) + logits[k - 1, row, i].max()
          total += lz - logits[k - 1, row, i, targets[row, i + k]]
  np.testing.assert_allclose(got, total / 2, rtol=1e-5)


def test_mtp_weight_enters_the_training_loss():
  """loss = nll / tokens + lambda * mtp / tokens (token terms share the normaliser)."""
  import ml_collections
  cfg = ml_collections.ConfigDict({'model': mtp_config(), 'train': {'z_loss_weight': 0.0}})
  cfg.model.mtp.loss_weight = 0.25
  model = Transformer(cfg.model)
  rng = np.random.default_rng(5)
  pos, seg = random_packed(rng, 2, 10)
  tokens = rng.integers(0, cfg.model.vocab_size, (2, 11))
  batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
           'positions': jnp.asarray(pos), 'segment_ids': jnp.asarray(seg)}
  params = random_like(init_shapes(model, batch['inputs'], batch['positions']), seed=2)
  loss, aux = jit(objective_lib.language_model(model, cfg).loss_fn)(params, batch, None)
  tokens_count = float(aux['sums']['tokens'])
  want = (float(aux['sums']['nll']) + 0.25 * float(aux['sums']['mtp_loss'])) / tokens_count
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(aux['sums']['mtp_loss']) > 0
