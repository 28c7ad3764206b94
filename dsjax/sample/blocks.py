"""Host-side block allocator for a paged KV cache with prefix caching (vLLM style); pure Python, no JAX.

The device cache is a pool of pages of `block_size` token slots; a request's block table lists its pages in order.
Page 0 is NULL_BLOCK: never handed out, so unused block-table entries can point at it. Pages 1..num_blocks are
managed here, each in exactly one state:
  - free: no content worth keeping; handed out first.
  - referenced: refcount > 0, in use by one or more requests. Several requests share a prompt prefix by holding
    references to the same blocks; a block may carry a key once all its slots are written.
  - cached: refcount 0 but keyed, so a later request with the same prefix can reuse it without recomputing it.
    Cached blocks sit in an LRU (OrderedDict, O(1) moves) and are evicted, oldest first, when the free list runs out.
A key names a FULL block by a hash chain over its token prefix (block_hash): block i's key covers tokens
[0, (i + 1) * block_size), so equal keys mean equal KV content (same model) and match() can reuse the longest run.
Partial blocks are never keyed: they are still being written.
"""
from __future__ import annotations

import collections
import hashlib
import numbers
import struct
from typing import Iterable, Sequence

NULL_BLOCK = 0  # device page 0 is never handed out; block tables point unused entries at it


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
  """Content key of a full block: sha256 over the parent block's key (b'' for the first block; any salt, e.g. a
  model or adapter id, may be passed as the first parent) and the block's token ids as int64 little-endian bytes.
  Chained, so a key names the whole prefix up to the block's end."""
  h = hashlib.sha256(parent or b'')
  h.update(struct.pack(f'<{len(tokens)}q', *(int(t) for t in tokens)))
  return h.digest()


def prefix_hashes(tokens: Sequence[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
  """Keys of every FULL block of `tokens` (len(tokens) // block_size of them), chained from `parent`."""
  if block_size < 1:
    raise ValueError(f'block_size must be >= 1, got {block_size}')
  keys = []
  for start in range(0, len(tokens) // block_size * block_size, block_size):
    parent = block_hash(parent, tokens[start:start + block_size])
    keys.append(parent)
  return keys


class BlockPool:
  """Blocks 1..num_blocks (device pages; page 0 is NULL_BLOCK), each free, referenced or cached (module doc)."""

  def __init__(self, num_blocks: int, block_size: int):
    if num_blocks < 1:
      raise ValueError(f'num_blocks must be >= 1, got {num_blocks}')
    if block_size < 1:
      raise ValueError(f'block_size must be >= 1, got {block_size}')
    self.num_blocks = num_blocks
    self.block_size = block_size
    self._refs = [0] * (num_blocks + 1)  # index 0 (NULL_BLOCK) unused
    self._free: collections.deque[int] = collections.deque(range(1, num_blocks + 1))
    self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached blocks, oldest first
    self._key_of: dict[int, bytes] = {}  # keyed block -> key
    self._block_of: dict[bytes, int] = {}  # key -> the one block holding it
    self.queried_blocks = 0
    self.hit_blocks = 0

  @property
  def num_free(self) -> int:
    """Blocks allocate() can hand out now: free + cached (evictable)."""
    return len(self._free) + len(self._lru)

  @property
  def num_used(self) -> int:
    """Referenced blocks."""
    return self.num_blocks - self.num_free

  @property
  def num_cached(self) -> int:
    """Unreferenced blocks kept for their content."""
    return len(self._lru)

  def refcount(self, block: int) -> int:
    """References held on `block` (0 for free or cached)."""
    return self._refs[self._check_id(block)]

  def key(self, block: int) -> bytes | None:
    """The content key `block` holds, if any."""
    return self._key_of.get(self._check_id(block))

  def allocate(self, n: int) -> list[int] | None:
    """n blocks with refcount 1 and no key, from the free list first, then by evicting the least recently used
    cached blocks (dropping their keys); None, taking nothing, when fewer than n are available."""
    if n < 0:
      raise ValueError(f'cannot allocate {n} blocks')
    if n > self.num_free:
      return None
    blocks = []
    for _ in range(n):
      if self._free:
        block = self._free.popleft()
      else:
        block, _ = self._lru.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
      self._refs[block] = 1
      blocks.append(block)
    return blocks

  def release(self, blocks: Iterable[int]) -> None:
    """Drops one reference from each block; a block reaching 0 becomes cached (most recently used end of the LRU)
    if keyed, else free. Pass a request's blocks tail first so its prefix blocks stay cached longest. ValueError
    naming the block, changing nothing, for NULL_BLOCK, an id out of range or more releases than references."""
    blocks = [self._check_id(block) for block in blocks]
    for block, count in collections.Counter(blocks).items():
      if self._refs[block] < count:
        raise ValueError(f'block {block} released {count} time(s) but has {self._refs[block]} reference(s)')
    for block in blocks:
      self._refs[block] -= 1
      if self._refs[block] == 0:
        if block in self._key_of:
          self._lru[block] = None
        else:
          self._free.append(block)

  def register(self, block: int, key: bytes) -> None:
    """Marks a referenced block as holding the full-block content `key` (once its tokens are all written). If
    another block already holds `key`, nothing changes (the first stays the cached copy); a block that already
    has a key keeps it (no-op if the same, ValueError if different)."""
    block = self._check_id(block)
    if self._refs[block] == 0:
      raise ValueError(f'block {block} is not referenced; only a block in use can be registered')
    old = self._key_of.get(block)
    if old is not None:
      if old != key:
        raise ValueError(f'block {block} already holds a different key')
      return
    if key in self._block_of:
      return
    self._key_of[block] = key
    self._block_of[key] = block

  def match(self, keys: Sequence[bytes]) -> list[int]:
    """The blocks holding the longest prefix of `keys` (stops at the first key not held), each given one more
    reference (a cached block leaves the LRU). Adds len(keys) to queried_blocks and the hits to hit_blocks."""
    blocks = []
    for key in keys:
      block = self._block_of.get(key)
      if block is None:
        break
      if self._refs[block] == 0:
        del self._lru[block]
      self._refs[block] += 1
      blocks.append(block)
    self.queried_blocks += len(keys)
    self.hit_blocks += len(blocks)
    return blocks

  def check(self) -> None:
    """Invariants, for tests: every block 1..num_blocks in exactly one state, refcounts >= 0, key maps consistent
    both ways, cached blocks keyed, free blocks unkeyed. Raises AssertionError on the first violation."""
    def require(ok: bool, message: str) -> None:
      if not ok:
        raise AssertionError(message)

    free, cached = set(self._free), set(self._lru)
    require(len(free) == len(self._free), 'duplicate block in the free list')
    require(not free & cached, f'blocks both free and cached: {sorted(free & cached)}')
    require(self._refs[NULL_BLOCK] == 0, 'NULL_BLOCK has references')
    for block in range(1, self.num_blocks + 1):
      refs = self._refs[block]
      require(refs >= 0, f'block {block} has refcount {refs}')
      states = (block in free) + (block in cached) + (refs > 0)
      require(states == 1, f'block {block} is in {states} states')
      require(block not in free or block not in self._key_of, f'free block {block} has a key')
      require(block not in cached or block in self._key_of, f'cached block {block} has no key')
    require(all(1 <= b <= self.num_blocks for b in free | cached | set(self._key_of)), 'block id out of range')
    require(len(self._key_of) == len(self._block_of), 'key maps differ in size')
    for block, key in self._key_of.items():
      require(self._block_of.get(key) == block, f'key of block {block} maps elsewhere')

  def _check_id(self, block: int) -> int:
    """`block` as a Python int (numpy integers from a block table are fine); ValueError unless in 1..num_blocks."""
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or not 1 <= block <= self.num_blocks:
      raise ValueError(f'block {block!r} is not a pool block (1..{self.num_blocks}; {NULL_BLOCK} is NULL_BLOCK)')
    return int(block)
