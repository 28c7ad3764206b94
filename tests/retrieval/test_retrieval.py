"""dsjax.retrieval against independent references: a textbook Okapi BM25 written here, hand-tokenized identifiers,
the model applied directly and mean-pooled by hand, numpy brute-force cosine ranking, and hand-built prompts."""
import collections
import json
import math
import os

import numpy as np
import pytest

from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data.corpus import Document
from dsjax.eval import completion
from dsjax.retrieval import __main__ as retrieval_main
from dsjax.retrieval import bm25 as bm25_lib
from dsjax.retrieval import dense as dense_lib
from dsjax.retrieval import evaluate as evaluate_lib
from dsjax.retrieval import prompt as prompt_lib
from dsjax.retrieval import snippets as snippets_lib
from dsjax.retrieval.index import Hit, RetrievalIndex
from dsjax.retrieval.snippets import Snippet
from tests.model import helpers
from tests.sample import test_engine

TOK = tokenizer_lib.ByteTokenizer()

CORPUS = [
    'def read_config(path):\n  with open(path) as f:\n    return json.load(f)\n',
    'def write_config(path, config):\n  with open(path, "w") as f:\n    json.dump(config, f)\n',
    'class HttpClient:\n  def getResponse(self, url):\n    return self.session.get(url)\n',
    'def parse_http_response(raw):\n  head, body = raw.split("\\r\\n\\r\\n", 1)\n  return head, body\n',
    'def add(a, b):\n  return a + b\n',
    'def mean(values):\n  return sum(values) / len(values)\n',
    'def config_path(name):\n  return os.path.join(CONFIG_DIR, name + ".json")\n',
]
SNIPPETS = [Snippet(f'f{i}.py:s{i}', t) for i, t in enumerate(CORPUS)]


# ------------------------------------------------------------------------------------------------ tokenizer

def test_code_tokens_split_identifiers_and_keep_them_whole():
  assert bm25_lib.code_tokens('def read_config(path):') == ['def', 'read_config', 'read', 'config', 'path']
  assert bm25_lib.code_tokens('x = parseHTTPResponse2(self)') == [
      'x', 'parsehttpresponse2', 'parse', 'http', 'response', '2', 'self']
  assert bm25_lib.code_tokens('__init__ + _FOO_bar.getURL') == [
      'init', 'foo_bar', 'foo', 'bar', 'geturl', 'get', 'url']
  assert bm25_lib.code_tokens('a.b[3] != "C d"  # e') == ['a', 'b', '3', 'c', 'd', 'e']
  assert bm25_lib.code_tokens('  +-*/ ') == []


# ------------------------------------------------------------------------------------------------ BM25

def okapi_bm25(docs, query, k1=1.5, b=0.75):
  """Textbook Okapi BM25, bm25s's 'lucene' variant: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term weight
  tf / (tf + k1 (1 - b + b |d| / avgdl)) (no (k1 + 1) factor: a constant that does not change rankings), summed
  over the query's tokens with repeats."""
  docs = [bm25_lib.code_tokens(d) for d in docs]
  n = len(docs)
  avgdl = sum(map(len, docs)) / n
  df = collections.Counter(t for d in docs for t in set(d))
  scores = []
  for d in docs:
    tf = collections.Counter(d)
    s = 0.0
    for t in bm25_lib.code_tokens(query):
      if df[t]:
        idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
        s += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
    scores.append(s)
  return np.array(scores)


@pytest.mark.parametrize('query', ['read config path', 'def read_config(path): json json', 'getResponse url',
                                   'unknown words only', 'return a + b'])
def test_bm25_scores_and_ranking_match_the_textbook_formula(query):
  index = RetrievalIndex.build(SNIPPETS, 'bm25')
  want = okapi_bm25(CORPUS, query)
  np.testing.assert_allclose(index.bm25.scores(query), want, rtol=1e-5, atol=1e-6)
  hits = index.search(query, 4)
  order = [i for i in np.argsort(-want, kind='stable') if want[i] > 0][:4]
  assert [h.name for h in hits] == [SNIPPETS[i].name for i in order]
  np.testing.assert_allclose([h.score for h in hits], want[order], rtol=1e-5)
  assert index.manifest['bm25'] == dict(tokenizer=bm25_lib.TOKENIZER_NAME, k1=1.5, b=0.75, method='lucene')


def test_a_near_copy_of_a_snippet_ranks_it_first():
  index = RetrievalIndex.build(SNIPPETS, 'bm25')
  for i, text in enumerate(CORPUS):
    query = text.replace('return', 'yield').split('\n')
    query = '\n'.join(query[:-2])  # drop the last line, change a keyword
    assert index.search(query, 1)[0].name == SNIPPETS[i].name, query


# ------------------------------------------------------------------------------------------------ snippets

def test_snippets_are_definitions_or_line_windows():
  source = ('import os\n\n@decorate\ndef f(x):\n  return x\n\nclass Small:\n  y = 1\n\n'
            'class Big:\n  def a(self):\n    return "' + 'a' * 60 + '"\n\n  def b(self):\n    pass\n')
  got = snippets_lib.document_snippets(Document('m.py', source), max_chars=50)
  assert [s.name for s in got] == ['m.py:f', 'm.py:Small', 'm.py:Big.a', 'm.py:Big.b']
  assert got[0].text == '@decorate\ndef f(x):\n  return x'
  assert got[2].text == '  def a(self):' and got[3].text == '  def b(self):\n    pass'  # capped at a line end
  text = '\n'.join(f'line {i} (' for i in range(1, 8))  # does not parse
  got = snippets_lib.document_snippets(Document('notes.txt', text), window_lines=3)
  assert [s.name for s in got] == ['notes.txt:L1-L3', 'notes.txt:L4-L6', 'notes.txt:L7-L7']
  assert got[1].text == 'line 4 (\nline 5 (\nline 6 ('
  docs = [Document('a.py', 'def a():\n  pass\n'), Document('b.txt', 'x y z')]
  assert [s.name for s in snippets_lib.corpus_snippets(docs)] == ['a.py:a', 'b.txt:L1-L1']
  assert len(snippets_lib.corpus_snippets(docs * 3, max_snippets=2)) == 2


# ------------------------------------------------------------------------------------------------ dense

@pytest.fixture(scope='module')
def embedder():
  model, params, _ = test_engine.shared_model()
  return dense_lib.Embedder(model, params, TOK, max_tokens=64, batch_size=4)


def hand_embedding(text):
  """The model applied to [bos] + bytes (cut to 64) alone, unpadded; mean of its final hidden states; unit norm."""
  model, params, _ = test_engine.shared_model()
  ids = np.array([TOK.bos_id] + TOK.encode(text).tolist(), np.int32)[:64]
  _, aux = _apply(model)(params, ids[None], np.arange(len(ids), dtype=np.int32)[None])
  v = np.asarray(aux['hidden'][0], np.float64).mean(0)
  return v / np.linalg.norm(v)


_APPLY = {}


def _apply(model):
  return _APPLY.setdefault(id(model), helpers.jit(lambda p, t, pos: model.apply({'params': p}, t, pos)))


def test_embeddings_equal_the_model_applied_directly_and_pooled_by_hand(embedder):
  texts = ['def f(): pass', CORPUS[0], CORPUS[2] * 3, 'x']  # widths 16, 64, 64 (cut), 16; one batch of 4
  got = embedder(texts)
  assert got.shape == (4, 32) and got.dtype == np.float32
  for text, vector in zip(texts, got):
    np.testing.assert_allclose(vector, hand_embedding(text), atol=2e-5)
  np.testing.assert_allclose(embedder(texts[1:2])[0], got[1], atol=2e-5)  # batch of one, same vector


def test_faiss_top_k_equals_numpy_brute_force():
  rng = np.random.default_rng(0)
  vectors = rng.normal(size=(300, 24)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  index = dense_lib.DenseIndex.build(vectors)
  for q in rng.normal(size=(5, 24)).astype(np.float32):
    q /= np.linalg.norm(q)
    cosine = vectors @ q
    indices, scores = index.search(q, 10)
    np.testing.assert_array_equal(indices, np.argsort(-cosine)[:10])
    np.testing.assert_allclose(scores, np.sort(cosine)[::-1][:10], rtol=1e-5, atol=1e-6)
  assert len(index.search(vectors[0], 1000)[0]) == 300


def test_dense_and_hybrid_search_rank_by_cosine_and_reciprocal_rank_fusion(embedder):
  dense = RetrievalIndex.build(SNIPPETS, 'dense', embedder=embedder)
  hybrid = RetrievalIndex.build(SNIPPETS, 'hybrid', embedder=embedder)
  lexical = RetrievalIndex.build(SNIPPETS, 'bm25')
  query = 'def load_config(path):'
  cosine = np.array([hand_embedding(t) for t in CORPUS]) @ hand_embedding(query)
  hits = dense.search(query, 3)
  assert [h.name for h in hits] == [SNIPPETS[i].name for i in np.argsort(-cosine)[:3]]
  np.testing.assert_allclose([h.score for h in hits], np.sort(cosine)[::-1][:3], atol=1e-4)
  fused = collections.Counter()
  for ranking in ([h.name for h in dense.search(query, 50)], [h.name for h in lexical.search(query, 50)]):
    for rank, name in enumerate(ranking, 1):
      fused[name] += 1 / (60 + rank)
  want = sorted(fused, key=lambda n: (-fused[n], int(n.split(':s')[1])))[:4]
  assert [h.name for h in hybrid.search(query, 4)] == want
  np.testing.assert_allclose([h.score for h in hybrid.search(query, 4)], [fused[n] for n in want], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ save / load

def test_index_round_trips_and_checks_the_model(tmp_path, embedder):
  model, params, _ = test_engine.shared_model()
  queries = ['read config', 'http response', 'mean of values']
  for kind in ('bm25', 'hybrid'):
    index = RetrievalIndex.build(SNIPPETS, kind, embedder=embedder if kind != 'bm25' else None,
                                 source={'source': 'test'})
    path = str(tmp_path / kind)
    index.save(path)
    index.save(path)  # replacing an index is fine
    assert not [n for n in os.listdir(tmp_path) if n.startswith('.')]  # no tmp dirs left behind
    loaded = RetrievalIndex.load(path, model=model, params=params, tokenizer=TOK)
    assert loaded.snippets == SNIPPETS and loaded.kind == kind and loaded.manifest == json.loads(json.dumps(
        index.manifest))
    for q in queries:
      assert [tuple(h[:2]) for h in loaded.search(q, 3)] == [tuple(h[:2]) for h in index.search(q, 3)]
      np.testing.assert_allclose([h.score for h in loaded.search(q, 3)], [h.score for h in index.search(q, 3)],
                                 rtol=1e-5)
  path = str(tmp_path / 'hybrid')
  with pytest.raises(ValueError, match='pass model, params and tokenizer'):
    RetrievalIndex.load(path)
  other = helpers.random_like(params, seed=7, std=0.5)
  with pytest.raises(ValueError, match='embeddings differ'):
    RetrievalIndex.load(path, model=model, params=other, tokenizer=TOK)
  info = json.load(open(os.path.join(path, 'manifest.json')))
  info['dense']['model']['config']['num_layers'] = 3
  json.dump(info, open(os.path.join(path, 'manifest.json'), 'w'))
  with pytest.raises(ValueError, match='different model.*num_layers'):
    RetrievalIndex.load(path, model=model, params=params, tokenizer=TOK)


def test_missing_or_corrupt_indexes_give_clear_errors(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='nope.*not found'):
    RetrievalIndex.load(missing)
  with pytest.raises(FileNotFoundError, match='no manifest.json'):
    RetrievalIndex.load(str(tmp_path))
  path = str(tmp_path / 'ix')
  RetrievalIndex.build(SNIPPETS, 'bm25').save(path)
  manifest = os.path.join(path, 'manifest.json')
  good = open(manifest).read()
  open(manifest, 'w').write(good[:40])
  with pytest.raises(ValueError, match=f'corrupt retrieval index manifest.*{os.path.basename(manifest)}.*JSON'):
    RetrievalIndex.load(path)
  open(manifest, 'w').write(good.replace('"bm25"', '"sparse"', 1))
  with pytest.raises(ValueError, match='kind'):
    RetrievalIndex.load(path)
  open(manifest, 'w').write(good)
  with open(os.path.join(path, 'snippets.jsonl'), 'a') as f:
    f.write('{"name": "extra", "text": ""}\n')
  with pytest.raises(ValueError, match='holds 8 snippets, the manifest says 7'):
    RetrievalIndex.load(path)
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  with pytest.raises(ValueError, match='refusing to overwrite'):
    RetrievalIndex.build(SNIPPETS, 'bm25').save(str(tmp_path / 'mine'))
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'


# ------------------------------------------------------------------------------------------------ prompts

HITS = [Hit('a.py:f', 'def f():\n  return 1\n', 3.0), Hit('b.py:g', 'def g():\n  return 2', 2.0),
        Hit('c.py:h', 'def h():\n  x = 1\n  return x', 1.0)]


def test_augment_prompt_keeps_the_prompt_at_the_end_and_respects_max_chars():
  prompt = 'import os\n\ndef k(x):\n  """Doc."""\n'
  full = prompt_lib.augment_prompt(prompt, HITS, 10_000)
  assert full == ('# Retrieved from c.py:h:\ndef h():\n  x = 1\n  return x\n\n'
                  '# Retrieved from b.py:g:\ndef g():\n  return 2\n\n'
                  '# Retrieved from a.py:f:\ndef f():\n  return 1\n\n' + prompt)
  first = '# Retrieved from a.py:f:\ndef f():\n  return 1\n\n'  # 46 characters
  assert prompt_lib.augment_prompt(prompt, HITS, 46) == first + prompt
  assert prompt_lib.augment_prompt(prompt, HITS, 45) == '# Retrieved from a.py:f:\ndef f():\n\n' + prompt  # cut
  assert prompt_lib.augment_prompt(prompt, HITS, 0) == prompt
  assert prompt_lib.augment_prompt(prompt, [], 100) == prompt
  for max_chars in range(0, len(full) + 5):
    got = prompt_lib.augment_prompt(prompt, HITS, max_chars)
    assert got.endswith(prompt) and len(got) - len(prompt) <= max_chars
  commented = prompt_lib.augment_prompt('', HITS[:1], 100, style='comment')
  assert commented == '# Retrieved from a.py:f:\n# def f():\n#   return 1\n\n'


def test_fit_augmented_stays_within_the_token_budget():
  prompt = 'def k(x):\n'
  for budget in range(5, 120, 7):
    got = prompt_lib.fit_augmented(prompt, HITS, TOK, budget)
    assert got.endswith(prompt)
    assert 1 + len(TOK.encode(got)) <= budget or got == prompt
  assert prompt_lib.fit_augmented(prompt, HITS, TOK, 1000) == prompt_lib.augment_prompt(prompt, HITS, 10**6)


def test_query_is_the_last_lines_and_left_cuts_keep_whole_lines():
  assert prompt_lib.build_query('a\nb\nc\nd\n\n', 2) == 'c\nd'
  assert prompt_lib.build_query('x', 10) == 'x'
  assert prompt_lib.keep_last_lines('aaaa\nbbb\ncc\n', TOK, 7) == 'bbb\ncc\n'
  assert prompt_lib.keep_last_lines('aaaa\nbbb\ncc\n', TOK, 100) == 'aaaa\nbbb\ncc\n'
  assert prompt_lib.keep_last_lines('aaaa\nbbbbbbbbbb', TOK, 4) == 'bbbb'


# ------------------------------------------------------------------------------------------------ evaluation

HELD_OUT = '''import json


def load_settings(path):
  """Reads the settings."""
  with open(path) as f:
    return json.load(f)


def average(values):
  """The mean."""
  return sum(values) / len(values)
'''


def test_evaluate_runs_with_and_without_retrieval_on_the_same_examples():
  model, params, _ = test_engine.shared_model()
  examples = completion.extract_functions(HELD_OUT, 'held.py')
  index = RetrievalIndex.build(SNIPPETS, 'bm25')
  results = evaluate_lib.evaluate_with_retrieval(model, params, TOK, examples, index, k=2, context=128,
                                                 max_new_tokens=4)
  assert results['count'] == len(examples) == 2
  for key in ('without_retrieval', 'with_retrieval'):
    assert results[key]['count'] == 2 and 0.0 <= results[key]['exact_match'] <= 1.0
  assert results['delta'] == results['with_retrieval']['exact_match'] - results['without_retrieval']['exact_match']
  assert results['mean_retrieved_chars'] > 0 and results['max_prompt_tokens'] == 124
  augmented, hits, _ = evaluate_lib.augmented_examples(examples, index, TOK, k=2, max_prompt_tokens=124)
  for ex, aug, hs in zip(examples, augmented, hits):
    assert hs and aug.prompt.startswith('# Retrieved from') and aug.target == ex.target
    assert 1 + len(TOK.encode(aug.prompt)) <= 124
    header = ex.prompt.rstrip('\n').split('\n')[-2:]  # def line and docstring survive the left cut
    assert aug.prompt.endswith('\n'.join(header) + '\n')
  assert 'delta' in evaluate_lib.format_table(results)


def test_leakage_check():
  cfg = helpers.base_config().data
  index = RetrievalIndex.build(SNIPPETS, 'bm25', source=dict(source='stdlib', split='all', validation_fraction=0.05))
  with pytest.raises(ValueError, match='--split=train'):
    evaluate_lib.check_no_leakage(index, cfg)
  index.manifest['source'].update(split='train', validation_fraction=0.1)
  with pytest.raises(ValueError, match='validation_fraction'):
    evaluate_lib.check_no_leakage(index, cfg)
  index.manifest['source'].update(validation_fraction=cfg.validation_fraction)
  with pytest.raises(ValueError, match='--dedup=near'):  # near copies of held-out documents may be in it
    evaluate_lib.check_no_leakage(index, cfg)
  index.manifest['source'].update(dedup='near')
  evaluate_lib.check_no_leakage(index, cfg)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_builds_searches_and_fails_cleanly(tmp_path, capsys):
  src = tmp_path / 'src'
  src.mkdir()
  for i, text in enumerate(CORPUS):
    (src / f'f{i}.py').write_text(text)
  out = str(tmp_path / 'ix')
  assert retrieval_main.main(['build', f'--source={src}', '--split=all', f'--out={out}']) == 0
  assert retrieval_main.main(['search', f'--index={out}', '--k=1', 'read_config path']) == 0
  printed = capsys.readouterr().out
  assert 'indexed 7 snippets of 7 documents' in printed and '1. f0.py:read_config' in printed
  for argv, message in ((['build', f'--source={tmp_path}/missing', f'--out={out}2'], 'does not exist'),
                        (['build', f'--source={src}', '--kind=dense', f'--out={out}2'], 'pass --checkpoint'),
                        (['search', f'--index={tmp_path}/none', 'q'], 'not found')):
    with pytest.raises(SystemExit) as e:
      retrieval_main.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith('error: ') and message in err and err.count('\n') == 1
