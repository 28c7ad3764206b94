"""The `retrieval` extension of /v1/completions: the answer equals a plain request for the augmented prompt built
here with index.search + augment_prompt; bad index names, k values and token-id prompts are 400s."""

import openai
import pytest

from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data.corpus import list_documents
from dsjax.retrieval import prompt as prompt_lib
from dsjax.retrieval.index import RetrievalIndex
from dsjax.retrieval.snippets import corpus_snippets
from dsjax.sample import engine as engine_lib
from dsjax.serve import api as serve_api
from tests.sample import test_engine
from tests import test_serve
from tests.test_serve import raw

MAX_LEN = 128  # = the tiny model's max_positions: room for retrieved snippets
TOKENIZER = tokenizer_lib.load_tokenizer('byte')
FILES = {
    'cfg.py': 'def read_cfg(p):\n  return open(p).read()\n',
    'm.py': 'def add(a,b): return a+b\n\n\ndef mul(a,b): return a*b\n',
    'notes.txt': 'nothing to see here\n',
}


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  """(base_url, index): the tiny model served as 'tiny' with a BM25 index 'code' over FILES."""
  src = tmp_path_factory.mktemp('src')
  for name, text in FILES.items():
    (src / name).write_text(text)
  index = RetrievalIndex.build(corpus_snippets(list_documents(str(src))), 'bm25')
  model, params, _ = test_engine.shared_model()
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, max_queue=4,
                             vocab_limit=TOKENIZER.vocab_size)
  app = serve_api.create_app(engine, TOKENIZER, 'tiny', max_len=MAX_LEN, retrieval_indexes={'code': index})
  with test_serve.serving(app) as url:
    yield url, index
  engine.shutdown(cancel=True)


def test_retrieval_completion_equals_a_plain_completion_of_the_augmented_prompt(server):
  c = openai.OpenAI(base_url=f'{server[0]}/v1', api_key='x', max_retries=0, timeout=120)
  prompt = 'def add3(a,b):\n'
  hits = server[1].search(prompt_lib.build_query(prompt), 2)
  assert [h.name for h in hits] == ['m.py:add', 'm.py:mul']  # 'add' (a part of 'add3'), 'a', 'b' match
  augmented = prompt_lib.augment_prompt(prompt, hits, 10_000)
  assert augmented.startswith('# Retrieved from m.py:mul:\n') and augmented.endswith(prompt)
  got = c.completions.create(model='tiny', prompt=prompt, max_tokens=4, temperature=0,
                             extra_body={'retrieval': {'index': 'code', 'k': 2}})
  plain = c.completions.create(model='tiny', prompt=augmented, max_tokens=4, temperature=0)
  assert got.choices[0].text == plain.choices[0].text
  assert got.usage.prompt_tokens == 1 + len(augmented.encode()) == plain.usage.prompt_tokens
  alone = c.completions.create(model='tiny', prompt=prompt, max_tokens=4, temperature=0)
  assert alone.usage.prompt_tokens == 1 + len(prompt)


def test_retrieved_text_is_cut_to_leave_room_for_max_tokens(server):
  prompt = 'def add3(a,b):\n'
  status, body = raw(server, '/v1/completions', dict(model='tiny', prompt=prompt, max_tokens=70, temperature=0,
                                                     retrieval={'index': 'code', 'k': 2}), key=None)
  assert status == 200
  assert body['usage']['prompt_tokens'] + 70 <= MAX_LEN
  assert body['usage']['prompt_tokens'] > 1 + len(prompt)  # some retrieved text still fits


@pytest.mark.parametrize('retrieval, prompt, param', [
    ({'index': 'docs', 'k': 2}, 'def f():', 'retrieval.index'),
    ({'k': 2}, 'def f():', 'retrieval.index'),
    ({'index': 'code', 'k': 0}, 'def f():', 'retrieval.k'),
    ({'index': 'code', 'k': 21}, 'def f():', 'retrieval.k'),
    ({'index': 'code', 'k': '2'}, 'def f():', 'retrieval.k'),
    ({'index': 'code', 'k': True}, 'def f():', 'retrieval.k'),
    ({'index': 'code', 'k': 2}, [1, 2, 3], 'retrieval'),
    ('code', 'def f():', 'retrieval'),
    ({'index': 'code', 'top': 2}, 'def f():', 'retrieval'),
])
def test_bad_retrieval_requests_are_400s_in_the_openai_shape(server, retrieval, prompt, param):
  status, body = raw(server, '/v1/completions', dict(model='tiny', prompt=prompt, max_tokens=2,
                                                     retrieval=retrieval), key=None)
  assert status == 400
  assert set(body['error']) == {'message', 'type', 'param', 'code'} and body['error']['param'] == param
  if param == 'retrieval.index':
    assert "available: code" in body['error']['message']
