"""The paged KV cache (dsjax/model/pages.py, cache.paged_cache) against the model without a cache: prompts fed in
chunks of different sizes through shuffled block tables give the logits of one full forward, for every attention
family (full, sparse window + global, routed, Transformer-XL, latent attention); a sparse model whose out-of-window
blocks are freed (table entries set to the null page) gives the same logits; and the page helpers against
hand-computed indices."""
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax.model import Transformer
from dsjax.model import cache as cache_lib
from dsjax.model import layout
from dsjax.model import pages
from tests.model import helpers
from tests.sample.test_latent_cache_decoding import tiny_moe_config

BLOCK = 4
LENGTH = 21
CHUNKS = [5, 1, 9, 1, 5]  # sums to LENGTH; chunks cross block boundaries


def model_and_params(kind):
  cfg = tiny_moe_config() if kind == 'mla' else helpers.tiny_config(kind, vocab_size=64)
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  return cfg, model, layout.for_decoding(helpers.random_like(shapes, seed=3, std=0.5))


def chunked_paged_logits(cfg, model, params, tokens, table, free_out_of_window=False):
  """Logits of `tokens` [B, T] fed chunk by chunk through a paged cache addressed by `table` [B, M]."""
  B = tokens.shape[0]
  pools = cache_lib.init_pages(cfg, int(table.max()) + 1, BLOCK, jnp.float32)
  table = np.array(table)
  start, outs = 0, []
  for n in CHUNKS:
    if free_out_of_window:  # blocks wholly before the first query's window, past the global tokens
      window, num_global = cfg.attention.window, cfg.attention.num_global
      for m in range(table.shape[1]):
        if (m + 1) * BLOCK - 1 <= start - window and m * BLOCK >= num_global:
          table[:, m] = pages.NULL_PAGE
    cache = cache_lib.paged_cache(pools, jnp.asarray(table), jnp.full((B,), start, jnp.int32))
    positions = jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (B, n))
    logits, aux = model.apply({'params': params}, tokens[:, start:start + n], positions, jnp.ones((B, n), jnp.int32),
                              cache=cache)
    pools = dict(k=aux['cache']['k'], v=aux['cache']['v'])
    outs.append(logits)
    start += n
  return jnp.concatenate(outs, axis=1), table


@pytest.mark.parametrize('kind', ['full', 'sparse', 'routed', 'xl',
                                  pytest.param('mla', marks=pytest.mark.slow)])  # the engine test pages MLA too
def test_chunked_paged_forward_equals_full_forward(kind):
  cfg, model, params = model_and_params(kind)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (2, LENGTH)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), tokens.shape)
  expected, _ = model.apply({'params': params}, tokens, positions, jnp.ones_like(tokens))
  blocks = -(-LENGTH // BLOCK)
  table = 1 + rng.permutation(2 * blocks).reshape(2, blocks)  # pages 1.., shuffled, disjoint between rows
  table = np.pad(table, ((0, 0), (0, 2)))  # two unallocated (null) entries past the end
  got, _ = chunked_paged_logits(cfg, model, params, tokens, table)
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_sparse_model_with_freed_out_of_window_blocks_is_exact():
  cfg, model, params = model_and_params('sparse')
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, (1, LENGTH)), jnp.int32)
  positions = jnp.arange(LENGTH, dtype=jnp.int32)[None]
  expected, _ = model.apply({'params': params}, tokens, positions, jnp.ones_like(tokens))
  table = np.arange(1, 7)[None]
  got, final_table = chunked_paged_logits(cfg, model, params, tokens, table, free_out_of_window=True)
  assert (final_table == pages.NULL_PAGE).sum() >= 2  # blocks were freed while decoding went on
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_page_helpers_against_hand_computed_indices():
  # 2 kv heads, 4 pages of 2 tokens, head dim 1; row 0 holds blocks in pages 3, 1; row 1 in page 2 then none.
  table = jnp.array([[3, 1], [2, 0]], jnp.int32)
  slots = jnp.array([[0, 3, 4], [1, 2, 0]], jnp.int32)  # 4 = past the table (M * bs); row 1 slot 2 is in no page
  flat = pages.physical_slots(table, slots, block_size=2, num_pages=4)
  np.testing.assert_array_equal(flat, [[6, 3, 8], [5, 8, 4]])
  pool = jnp.zeros((2, 4, 2, 1))
  new = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1, 1) * jnp.array([1.0, -1.0]).reshape(1, 1, 2, 1)
  written = pages.write_pages(pool, new, table, slots)
  expected = np.zeros((2, 8))
  expected[0, [6, 3, 5, 4]] = [1, 2, 4, 6]
  expected[1] = -expected[0]
  np.testing.assert_array_equal(written.reshape(2, 8), expected)
  view = pages.gather_pages(written, table)  # [B, 4, K, 1]
  np.testing.assert_array_equal(view[0, :, 0, 0], [1, 0, 0, 2])  # page 3 then page 1
  np.testing.assert_array_equal(view[1, :, 1, 0], [-6, -4, 0, 0])  # page 2 then the null page
