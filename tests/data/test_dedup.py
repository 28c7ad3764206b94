"""Exact and near-duplicate detection, against Jaccard similarities of shingle sets computed here with plain sets.

MinHash is probabilistic, so the planted near copies have a true Jaccard similarity >= 0.9 and the planted far copies
<= 0.5 (the threshold is 0.8; with 128 permutations the estimate's standard deviation is <= 0.045), and everything
is seeded: the test is deterministic and far from the decision boundary.
"""
import random
import re

import pytest

from dsjax.data import dedup

THRESHOLD = 0.8


def oracle_shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
  words = re.findall(r'\w+', text)
  if len(words) < k:
    return {tuple(words)} if words else set()
  return {tuple(words[i:i + k]) for i in range(len(words) - k + 1)}


def jaccard(a: str, b: str) -> float:
  sa, sb = oracle_shingles(a), oracle_shingles(b)
  return len(sa & sb) / len(sa | sb)


def make_corpus():
  """(texts, planted): 40 random documents, then copies of some of them appended (exact, whitespace variants, near
  copies with 1 word in 100 replaced, far copies with 1 in 6 or 10 replaced). `planted` lists (kind, original, copy)."""
  rng = random.Random(1234)
  vocab = [''.join(rng.choice('abcdefghijklmnopqrstuvwxyz') for _ in range(rng.randint(3, 9))) for _ in range(3000)]

  def doc(n):
    return ' '.join(rng.choice(vocab) for _ in range(n))

  def replace_words(text, every):
    words = text.split(' ')
    for i in range(rng.randrange(every), len(words), every):
      words[i] = rng.choice(vocab) + 'x'  # 'x' makes the replacement differ from the original word
    return ' '.join(words)

  def reformat(text):
    words = text.split(' ')
    return '\n\t'.join(' '.join(words[i:i + 7]) for i in range(0, len(words), 7)) + '  \n\n'

  texts = [doc(rng.randint(250, 450)) for _ in range(40)]
  planted = []

  def plant(kind, original, text):
    planted.append((kind, original, len(texts)))
    texts.append(text)

  plant('exact', 3, texts[3])
  plant('exact', 5, reformat(texts[5]))
  plant('exact', 5, texts[5] + '\n')
  for i in (7, 11, 19):
    plant('near', i, replace_words(texts[i], 100))
  plant('near', 23, texts[23] + ' ' + doc(3))  # a few words appended
  plant('near', 29, ' '.join(texts[29].split(' ')[4:]))  # a few words cut
  for i, every in ((13, 6), (17, 10)):
    plant('far', i, replace_words(texts[i], every))
  plant('near_of_near', 7, texts[43])  # an exact copy of the first near copy (index 43): a near-duplicate of 7
  for _ in range(5):
    texts.append(doc(rng.randint(250, 450)))  # more unrelated documents after the copies
  return texts, planted


@pytest.fixture(scope='module')
def corpus_and_result():
  texts, planted = make_corpus()
  return texts, planted, dedup.deduplicate(texts, dedup.DedupConfig(threshold=THRESHOLD))


def test_planted_pairs_have_the_intended_true_similarity():
  texts, planted = make_corpus()
  assert [copy for _, _, copy in planted] == list(range(40, 51)) and len(texts) == 56
  for kind, original, copy in planted:
    j = jaccard(texts[original], texts[copy])
    if kind in ('exact', 'near_of_near'):
      assert j >= 0.9, (kind, original, copy, j)
    elif kind == 'near':
      assert 0.9 <= j < 1.0, (kind, original, copy, j)
    else:
      assert j <= 0.5, (kind, original, copy, j)


def test_duplicates_are_dropped_and_map_to_the_kept_original(corpus_and_result):
  texts, planted, result = corpus_and_result
  for kind, original, copy in planted:
    if kind == 'exact':
      assert result.exact_duplicates[copy] == original
    elif kind in ('near', 'near_of_near'):
      assert result.near_duplicates[copy] == original
    else:
      assert copy in result.keep and original in result.keep
  dropped = {c for kind, _, c in planted if kind != 'far'}
  assert result.keep == [i for i in range(len(texts)) if i not in dropped]
  assert set(result.exact_duplicates) | set(result.near_duplicates) == dropped
  assert not set(result.exact_duplicates) & set(result.near_duplicates)


def test_no_kept_pair_is_a_true_near_duplicate(corpus_and_result):
  texts, _, result = corpus_and_result
  shingles = {i: oracle_shingles(texts[i]) for i in result.keep}
  for a in result.keep:
    for b in result.keep:
      if a < b:
        j = len(shingles[a] & shingles[b]) / len(shingles[a] | shingles[b])
        assert j <= 0.5, (a, b, j)


def test_the_earliest_copy_is_kept():
  texts, _ = make_corpus()
  near_copy = texts[43]  # near copy of texts[7]
  order = [near_copy] + texts[:40]  # the copy now comes first: it is kept and texts[7] (now at 8) maps to it
  result = dedup.deduplicate(order, dedup.DedupConfig())
  assert 0 in result.keep and result.near_duplicates == {8: 0} and result.exact_duplicates == {}


def test_exact_mode_and_none_mode(corpus_and_result):
  texts, planted, near_result = corpus_and_result
  result = dedup.deduplicate(texts, dedup.DedupConfig(mode='exact'))
  assert result.near_duplicates == {}
  assert result.exact_duplicates == near_result.exact_duplicates | {50: 43}  # 50 is an exact copy of 43
  assert result.keep == [i for i in range(len(texts)) if i not in result.exact_duplicates]
  result = dedup.deduplicate(texts, dedup.DedupConfig(mode='none'))
  assert result.keep == list(range(len(texts))) and not result.exact_duplicates and not result.near_duplicates


def test_short_and_empty_documents():
  texts = ['', '  \n', 'a b', 'a  b\n', 'a b c', 'x']
  result = dedup.deduplicate(texts, dedup.DedupConfig())
  assert result.exact_duplicates == {1: 0, 3: 2}
  assert result.keep == [0, 2, 4, 5] and result.near_duplicates == {}


def test_deterministic(corpus_and_result):
  texts, _, result = corpus_and_result
  assert dedup.deduplicate(texts, dedup.DedupConfig(threshold=THRESHOLD)) == result


@pytest.mark.parametrize('kwargs, message', [
    (dict(mode='fuzzy'), "dedup.mode must be one of ('none', 'exact', 'near'), got 'fuzzy'"),
    (dict(threshold=0.0), 'dedup.threshold must be in (0, 1], got 0.0'),
    (dict(threshold=1.5), 'dedup.threshold must be in (0, 1], got 1.5'),
    (dict(num_perm=1), 'dedup.num_perm must be an integer >= 2'),
    (dict(shingle=0), 'dedup.shingle must be an integer >= 1'),
])
def test_bad_config(kwargs, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    dedup.DedupConfig(**kwargs)
