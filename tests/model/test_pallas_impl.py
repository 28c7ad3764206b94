"""impl='pallas' (the block-sparse and routed kernels, interpret mode on CPU) against impl='reference' on the whole model:
same logits and same gradients for every kind the kernel serves."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import Transformer
from tests.model.helpers import init_shapes, random_like, random_packed, tiny_config


@pytest.mark.parametrize('kind', ['full', 'sparse', 'routed', 'routed_sparse'])
def test_pallas_matches_reference_logits_and_grads(kind):
  rng = np.random.default_rng(0)
  batch, t_len = 2, 40  # 40 is not a multiple of the kernel's blocks
  pos, seg = random_packed(rng, batch, t_len)
  tokens = jnp.asarray(rng.integers(1, 64, (batch, t_len)), jnp.int32)
  models = {impl: Transformer(tiny_config(kind, attention=dict(impl=impl))) for impl in ('reference', 'pallas')}
  params = random_like(init_shapes(models['reference'], tokens, pos, seg), seed=3)
  valid = jnp.asarray(seg > 0)

  def loss(p, impl):
    logits, aux = models[impl].apply({'params': p}, tokens, jnp.asarray(pos), jnp.asarray(seg))
    logp = jax.nn.log_softmax(logits)[..., 0]
    return -jnp.sum(jnp.where(valid, logp, 0.0)) / valid.sum() + aux['router_loss'], logits

  results = {impl: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(params, impl)
             for impl in models}
  (ref_loss, ref_logits), ref_grads = results['reference']
  (pal_loss, pal_logits), pal_grads = results['pallas']
  # Padding rows are outside the kernel's contract (their keys may be skipped) and carry no loss.
  np.testing.assert_allclose(np.asarray(pal_logits)[seg > 0], np.asarray(ref_logits)[seg > 0], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pal_loss, ref_loss, rtol=1e-5)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree_util.tree_leaves(pal_grads)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-3, err_msg=jax.tree_util.keystr(path))
