"""The paged-KV block allocator: hand-worked cases, the hash chain, and a random walk against a plain-dict model."""
import hashlib
import random

import numpy as np
import pytest

from dsjax.sample import blocks as blocks_lib
from dsjax.sample.blocks import NULL_BLOCK, BlockPool, block_hash, prefix_hashes


def keyed_pool(num_blocks: int, keys: list[bytes]) -> tuple[BlockPool, list[int]]:
  """A pool whose first len(keys) blocks hold `keys` and are referenced once each."""
  pool = BlockPool(num_blocks, block_size=2)
  got = pool.allocate(len(keys))
  for block, key in zip(got, keys):
    pool.register(block, key)
  return pool, got


def test_constructor_errors_and_null_block():
  assert NULL_BLOCK == 0
  for num_blocks, block_size in [(0, 4), (-1, 4), (4, 0), (4, -2)]:
    with pytest.raises(ValueError):
      BlockPool(num_blocks, block_size)
  pool = BlockPool(3, 16)
  assert (pool.num_blocks, pool.block_size) == (3, 16)
  assert (pool.num_free, pool.num_used, pool.num_cached) == (3, 0, 0)
  pool.check()


def test_allocate_release_and_exhaustion():
  pool = BlockPool(4, 2)
  assert pool.allocate(0) == []
  first = pool.allocate(3)
  assert sorted(first) == [1, 2, 3]  # page 0 never handed out
  assert (pool.num_free, pool.num_used) == (1, 3)
  assert pool.allocate(2) is None  # only one left: nothing is taken
  assert (pool.num_free, pool.num_used) == (1, 3)
  assert pool.allocate(1) == [4]
  assert pool.allocate(1) is None
  pool.release(first[:2])
  assert (pool.num_free, pool.num_used, pool.num_cached) == (2, 2, 0)  # unkeyed blocks go back to free
  assert all(pool.refcount(b) == 0 and pool.key(b) is None for b in first[:2])
  assert sorted(pool.allocate(2)) == sorted(first[:2])
  pool.check()
  with pytest.raises(ValueError):
    pool.allocate(-1)


def test_register_release_caches_and_match_reuses():
  pool, (a, b) = keyed_pool(4, [b'k1', b'k2'])
  assert pool.key(a) == b'k1' and pool.key(b) == b'k2'
  pool.release([b, a])
  assert (pool.num_free, pool.num_used, pool.num_cached) == (4, 0, 2)  # cached blocks count as available
  assert pool.match([b'k1', b'k2', b'k3']) == [a, b]
  assert (pool.num_used, pool.num_cached) == (2, 0)
  assert pool.refcount(a) == pool.refcount(b) == 1
  assert (pool.queried_blocks, pool.hit_blocks) == (3, 2)
  pool.check()


def test_eviction_is_free_list_first_then_least_recently_used():
  pool, (b1, b2, b3) = keyed_pool(4, [b'k1', b'k2', b'k3'])
  pool.release([b2])
  pool.release([b3])
  pool.release([b1])  # LRU order now b2, b3, b1
  assert pool.match([b'k3']) == [b3]  # reused: leaves the LRU
  pool.release([b3])  # back at the most recently used end: b2, b1, b3
  assert pool.allocate(1) == [4]  # the never-used free block goes first, no eviction
  assert pool.num_cached == 3
  assert pool.allocate(1) == [b2]  # then the least recently used cached block, key dropped
  assert pool.key(b2) is None and pool.match([b'k2']) == []
  assert pool.allocate(2) == [b1, b3]
  assert pool.match([b'k1']) == [] and pool.match([b'k3']) == []
  assert (pool.num_free, pool.num_used, pool.num_cached) == (0, 4, 0)
  pool.check()


def test_match_stops_at_first_miss():
  pool, (b1, _, b3) = keyed_pool(3, [b'k1', b'k2', b'k3'])
  assert pool.match([b'k1', b'missing', b'k3']) == [b1]
  assert pool.match([b'missing', b'k1']) == []
  assert pool.match([]) == []
  assert (pool.queried_blocks, pool.hit_blocks) == (5, 1)
  assert pool.refcount(b1) == 2 and pool.refcount(b3) == 1
  pool.check()


def test_shared_references():
  pool, (a,) = keyed_pool(2, [b'k'])
  assert pool.match([b'k']) == [a] and pool.match([b'k']) == [a]
  assert pool.refcount(a) == 3
  pool.release([a, a])
  assert (pool.refcount(a), pool.num_used, pool.num_cached) == (1, 1, 0)  # still held by one request
  pool.release([a])
  assert (pool.refcount(a), pool.num_used, pool.num_cached) == (0, 0, 1)
  pool.check()


def test_release_errors_name_the_block_and_change_nothing():
  pool = BlockPool(3, 2)
  a, b = pool.allocate(2)
  for bad in [NULL_BLOCK, 4, -1]:
    with pytest.raises(ValueError, match=str(bad)):
      pool.release([bad])
  with pytest.raises(ValueError, match='is not a pool block'):
    pool.release([1.0])
  with pytest.raises(ValueError, match=f'block {a} '):
    pool.release([b, a, a])  # one reference, two releases: nothing is dropped, not even b's
  assert pool.refcount(a) == pool.refcount(b) == 1
  pool.release([a])
  with pytest.raises(ValueError, match=f'block {a} '):
    pool.release([a])  # double release
  pool.release([np.int64(b)])  # numpy ids from a block table are fine
  assert pool.num_free == 3
  pool.check()


def test_register_rules():
  pool = BlockPool(4, 2)
  a, b = pool.allocate(2)
  with pytest.raises(ValueError, match='not referenced'):
    pool.register(3, b'k')  # free block
  with pytest.raises(ValueError):
    pool.register(NULL_BLOCK, b'k')
  pool.register(a, b'k')
  pool.register(a, b'k')  # same key again: no-op
  with pytest.raises(ValueError, match=f'block {a} '):
    pool.register(a, b'other')
  pool.register(b, b'k')  # another block holds b'k': nothing changes
  assert pool.key(a) == b'k' and pool.key(b) is None
  pool.release([a, b])
  assert pool.num_cached == 1 and pool.match([b'k']) == [a]  # the first stays the cached copy; b went free
  pool.check()


def test_block_hash_is_a_sha256_chain():
  tokens = [5, 0, 70000, 2**40]
  assert block_hash(None, np.asarray(tokens[:3], np.int32)) == block_hash(None, tokens[:3])
  expected = hashlib.sha256(np.asarray(tokens, '<i8').tobytes()).digest()
  assert block_hash(None, tokens) == expected == block_hash(b'', tokens)
  assert block_hash(None, np.asarray(tokens, np.int64)) == expected
  child = block_hash(expected, [1, 2])
  assert child == hashlib.sha256(expected + np.asarray([1, 2], '<i8').tobytes()).digest()
  assert block_hash(None, [1, 2]) != child  # same tokens, different parent
  assert block_hash(None, [1, 2]) != block_hash(None, [2, 1])


def test_prefix_hashes_chain_full_blocks_only():
  tokens = list(range(10, 17))  # 7 tokens, block_size 3: two full blocks, one partial
  h1 = hashlib.sha256(np.asarray([10, 11, 12], '<i8').tobytes()).digest()
  h2 = hashlib.sha256(h1 + np.asarray([13, 14, 15], '<i8').tobytes()).digest()
  assert prefix_hashes(tokens, 3) == [h1, h2]
  assert prefix_hashes(tokens[:6], 3) == [h1, h2]
  assert prefix_hashes(tokens[:2], 3) == []
  assert prefix_hashes([99] + tokens[1:], 3)[1] != h2  # a changed earlier token changes every later key
  salted = prefix_hashes(tokens, 3, parent=b'model-a')
  assert salted[0] == hashlib.sha256(b'model-a' + np.asarray([10, 11, 12], '<i8').tobytes()).digest()
  assert salted != [h1, h2]
  with pytest.raises(ValueError):
    prefix_hashes(tokens, 0)


def test_two_requests_share_a_prompt_prefix():
  pool = BlockPool(8, 4)
  prompt_a = list(range(100, 110))  # 2 full blocks + 2 tokens
  table_a = pool.allocate(3)
  for block, key in zip(table_a, prefix_hashes(prompt_a, 4)):
    pool.register(block, key)
  prompt_b = prompt_a[:8] + [7, 7, 7, 7, 7]  # same first two blocks
  keys_b = prefix_hashes(prompt_b, 4)
  hit = pool.match(keys_b)
  assert hit == table_a[:2]
  table_b = hit + pool.allocate(2)
  assert pool.num_used == 5 and pool.refcount(table_a[0]) == 2
  pool.release(reversed(table_a))
  pool.release(reversed(table_b))
  assert (pool.num_free, pool.num_used, pool.num_cached) == (8, 0, 2)
  assert (pool.queried_blocks, pool.hit_blocks) == (3, 2)
  pool.check()


def test_check_catches_a_corrupted_pool():
  pool, (a,) = keyed_pool(3, [b'k'])
  pool.release([a])
  pool._free.append(a)  # cached and free at once
  with pytest.raises(AssertionError):
    pool.check()


class Model:
  """The pool's intended behaviour in plain dicts: refcounts, keys, free set, cached blocks oldest first."""

  def __init__(self, num_blocks: int):
    self.refs = {b: 0 for b in range(1, num_blocks + 1)}
    self.key = {}  # block -> key
    self.owner = {}  # key -> block
    self.free = set(self.refs)
    self.lru = []  # cached blocks, least recently used first

  def available(self) -> int:
    return len(self.free) + len(self.lru)


def test_random_operations_against_model():
  rng = random.Random(0)
  num_blocks = 8
  pool, model = BlockPool(num_blocks, block_size=2), Model(num_blocks)
  universe = [block_hash(None, [i]) for i in range(6)]
  held = []  # one entry per reference the test holds
  queried = hits = 0
  for step in range(2000):
    op = rng.choice(['allocate', 'release', 'register', 'match', 'bad_release'])
    if op == 'allocate':
      n = rng.randint(0, 4)
      got = pool.allocate(n)
      if n > model.available():
        assert got is None, step
      else:
        assert len(got) == len(set(got)) == n, step
        n_free = len(model.free)
        if n <= n_free:
          assert set(got) <= model.free, step
        else:  # every free block, then exactly the oldest cached ones
          evicted = model.lru[:n - n_free]
          assert set(got) == model.free | set(evicted), step
          model.lru = model.lru[n - n_free:]
          for b in evicted:
            del model.owner[model.key.pop(b)]
        for b in got:
          model.free.discard(b)
          model.refs[b] = 1
        held += got
    elif op == 'release' and held:
      chosen = rng.sample(range(len(held)), rng.randint(1, len(held)))
      batch = [held[i] for i in chosen]
      held = [b for i, b in enumerate(held) if i not in set(chosen)]
      pool.release(batch)
      for b in batch:
        model.refs[b] -= 1
        if model.refs[b] == 0:
          if b in model.key:
            model.lru.append(b)
          else:
            model.free.add(b)
    elif op == 'bad_release':
      unheld = [b for b, r in model.refs.items() if r == 0] + [NULL_BLOCK, num_blocks + 1]
      with pytest.raises(ValueError):
        pool.release(held[:1] + [rng.choice(unheld)])
    elif op == 'register' and held:
      b, k = rng.choice(held), rng.choice(universe)
      if b in model.key and model.key[b] != k:
        with pytest.raises(ValueError):
          pool.register(b, k)
      else:
        pool.register(b, k)
        if b not in model.key and k not in model.owner:
          model.key[b], model.owner[k] = k, b
    elif op == 'match':
      keys = [rng.choice(universe) for _ in range(rng.randint(0, 4))]
      want = []
      for k in keys:
        if k not in model.owner:
          break
        want.append(model.owner[k])
      assert pool.match(keys) == want, step
      for b in want:
        if model.refs[b] == 0:
          model.lru.remove(b)
        model.refs[b] += 1
      held += want
      queried, hits = queried + len(keys), hits + len(want)
    pool.check()
    assert all(pool.refcount(b) == model.refs[b] for b in model.refs), step
    assert all(pool.key(b) == model.key.get(b) for b in model.refs), step
    assert pool.num_free == model.available(), step
    assert pool.num_cached == len(model.lru), step
    assert pool.num_used == sum(r > 0 for r in model.refs.values()), step
    assert sorted(held) == sorted(b for b, r in model.refs.items() for _ in range(r)), step
    assert (pool.queried_blocks, pool.hit_blocks) == (queried, hits), step
  assert hits > 50 and queried > hits  # the walk exercised cache hits and misses
  pool.release(held)
  pool.check()
  assert (pool.num_free, pool.num_used) == (num_blocks, 0)
  assert pool.num_cached == len(model.key)
  assert all(pool.refcount(b) == 0 for b in range(1, num_blocks + 1))


def test_module_is_host_only():
  assert 'jax' not in vars(blocks_lib) and 'np' not in vars(blocks_lib)
