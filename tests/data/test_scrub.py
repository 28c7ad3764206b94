"""Secret / personal-data scrubbing, against a fixture whose findings were counted by hand."""
import collections
import json
import os
import pickle
import subprocess
import sys
import threading

import pytest

from dsjax.data import corpus, scrub

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'fixtures', 'planted_secrets.txt')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Hand-counted from tests/fixtures/planted_secrets.txt (one per planted value; each section header says how many).
EXPECTED_COUNTS = {'api_key': 9, 'private_key': 2, 'password': 3, 'email': 2, 'ipv4': 2, 'ipv6': 2}
PLANTED = [
    'AKIAIOSFODNN7EXAMPLE', 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY', 'ghp_FAKEexampleTOKEN0123456789abcdefghij',
    'xoxb-0000000000-0000000000000-FAKEfakeFAKEfake0000', 'sk_live_FAKE0000example0000FAKE0',
    'eyJhbGciOiJIUzI1NiJ9', 'ZmFrZS1zaWduYXR1cmU', 'FAKEtoken0123456789abcdefXYZ',
    'sk-proj-FAKE0123456789abcdefFAKE0123456789', 'AIzaSyFAKE-example_key_0123456789abcdef',
    'MIIEowIBAAKCAQEAFAKE', 'ZmFrZSBrZXkgbWF0ZXJpYWwg', 'b3BlbnNzaC1rZXktdjEAAAAA', 'END RSA PRIVATE KEY',
    'hunter2-fake', 'FakePass!2024', 'FakeDbPass99', 'jane.doe', 'ops-team+alerts',
    '93.184.216.34', '151.101.1.69', '2606:4700:4700::1111', '2a00:1450:4001:0829',
]


def read_fixture() -> str:
  with open(FIXTURE, encoding='utf-8') as f:
    return f.read()


@pytest.fixture(scope='module')
def scrubber():
  return scrub.Scrubber()


def test_fixture_counts_per_category(scrubber):
  _, counts = scrubber.scrub(read_fixture())
  assert dict(counts) == EXPECTED_COUNTS


def test_planted_values_are_masked_and_placeholders_present(scrubber):
  out, _ = scrubber.scrub(read_fixture())
  for value in PLANTED:
    assert value not in out, value
  expected_placeholders = {'<API_KEY>': 9, '<PRIVATE_KEY>': 2, '<PASSWORD>': 3, '<EMAIL>': 2, '<IP_ADDRESS>': 4}
  for placeholder, n in expected_placeholders.items():
    assert out.count(placeholder) == n, placeholder


def test_look_alikes_and_code_are_unchanged(scrubber):
  text = read_fixture()
  out, _ = scrubber.scrub(text)
  keep_lines = [line for line in text.splitlines() if line.rstrip().endswith('# keep')
                or '# keep (' in line]
  assert len(keep_lines) == 24  # hand-counted
  out_lines = set(out.splitlines())
  for line in keep_lines:
    assert line in out_lines, line
  # Everything outside the planted sections is byte-identical (the class at the end included).
  assert out[out.index('# --- look-alikes'):] == text[text.index('# --- look-alikes'):]


def test_small_snippet_exact_output(scrubber):
  text = ('db_password = "hunter2-fake"  # set by ops\n'
          'server = ("93.184.216.34", 8080)  # not 127.0.0.1\n'
          '@property\n'
          'def f(self): return self.a@self.b.T\n'
          'contact: jane.doe@fakecorp.dev.\n'
          'url = "https://admin:FakeDbPass99@db.fakecorp.dev/x"\n'
          'version = "3.11.4"\n')
  expected = ('db_password = "<PASSWORD>"  # set by ops\n'
              'server = ("<IP_ADDRESS>", 8080)  # not 127.0.0.1\n'
              '@property\n'
              'def f(self): return self.a@self.b.T\n'
              'contact: <EMAIL>.\n'
              'url = "https://admin:<PASSWORD>@db.fakecorp.dev/x"\n'
              'version = "3.11.4"\n')
  out, counts = scrubber.scrub(text)
  assert out == expected
  assert counts == collections.Counter({'password': 2, 'ipv4': 1, 'email': 1})


def test_overlapping_findings_merge_into_one_longest_wins(scrubber):
  # The bearer rule (token only) and the JWT rules (whole token; detect-secrets' stops before the signature) overlap.
  jwt = 'eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJmYWtlIn0.ZmFrZS1zaWduYXR1cmU'
  out, counts = scrubber.scrub(f'h = "Authorization: Bearer {jwt}"\n')
  assert out == 'h = "Authorization: Bearer <API_KEY>"\n'
  assert counts == collections.Counter({'api_key': 1})
  # A PEM block containing token-like text is one private key.
  out, counts = scrubber.scrub('-----BEGIN PRIVATE KEY-----\nAKIAIOSFODNN7EXAMPLEAAAAAAAAAAAA\n'
                               '-----END PRIVATE KEY-----\n')
  assert out == '<PRIVATE_KEY>\n' and counts == collections.Counter({'private_key': 1})


def test_clean_text_is_returned_unchanged(scrubber):
  text = 'def add(a, b):\n  return a + b  # 1.2.3, ::, x[::2]\n'
  out, counts = scrubber.scrub(text)
  assert out is text and not counts


def test_drop_document_mode():
  s = scrub.Scrubber(scrub.ScrubConfig(mode='drop_document'))
  out, counts = s.scrub(read_fixture())
  assert out is None and dict(counts) == EXPECTED_COUNTS
  assert s.scrub('x = 1\n') == ('x = 1\n', collections.Counter())


def test_category_subset_and_own_rules_only():
  s = scrub.Scrubber(scrub.ScrubConfig(categories=('email', 'ipv6')))
  out, counts = s.scrub(read_fixture())
  assert dict(counts) == {'email': 2, 'ipv6': 2}
  assert 'AKIAIOSFODNN7EXAMPLE' in out and '93.184.216.34' in out
  # Without detect-secrets the rules written here still find every planted value.
  _, counts = scrub.Scrubber(scrub.ScrubConfig(use_detect_secrets=False)).scrub(read_fixture())
  assert dict(counts) == EXPECTED_COUNTS


def test_high_entropy_is_opt_in():
  text = 'SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"\n'
  assert scrub.Scrubber().scrub(text)[0] == text
  out, counts = scrub.Scrubber(scrub.ScrubConfig(high_entropy=True)).scrub(text)
  assert out == 'SHA256 = "<API_KEY>"\n' and counts == collections.Counter({'api_key': 1})


@pytest.mark.parametrize('kwargs, message', [
    (dict(categories=('email', 'phone')), "unknown category 'phone'; allowed: email, ipv4"),
    (dict(categories='email'), 'sequence of category names'),
    (dict(mode='redact'), "scrub.mode must be one of ('mask', 'drop_document'), got 'redact'"),
])
def test_bad_config_errors(kwargs, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    scrub.ScrubConfig(**kwargs)


def test_scrubber_pickles_and_is_shared_by_threads(scrubber):
  clone = pickle.loads(pickle.dumps(scrubber))
  text = read_fixture()
  expected = scrubber.scrub(text)
  assert clone.scrub(text) == expected
  results = []
  threads = [threading.Thread(target=lambda: results.append(scrubber.scrub(text))) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert results == [expected] * 4


def test_report_table():
  report = scrub.scrub_report(collections.Counter({'email': 3, 'api_key': 1}), 10, 2)
  lines = report.splitlines()
  assert lines[0].split() == ['category', 'findings']
  assert ['email', '3'] in [line.split() for line in lines] and ['ipv6', '0'] in [line.split() for line in lines]
  assert lines[-2].split() == ['total', '4']
  assert lines[-1] == 'documents: 10 scanned, 2 with findings (20.00%)'


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'dsjax.data.scrub', *args], capture_output=True, text=True, cwd=REPO,
                        timeout=120)


def test_cli_counts_and_jsonl(tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  (src / 'a.py').write_text(read_fixture(), encoding='utf-8')
  (src / 'b.py').write_text('print("hello")\n', encoding='utf-8')
  out_path = tmp_path / 'out.jsonl'
  proc = run_cli(str(src), f'--out={out_path}')
  assert proc.returncode == 0, proc.stderr
  rows = {line.split()[0]: line.split()[1] for line in proc.stdout.splitlines() if len(line.split()) == 2}
  assert {c: int(rows[c]) for c in EXPECTED_COUNTS} == EXPECTED_COUNTS
  assert 'documents: 2 scanned, 1 with findings' in proc.stdout
  records = [json.loads(line) for line in out_path.read_text(encoding='utf-8').splitlines()]
  assert [r['name'] for r in records] == ['a.py', 'b.py']
  assert records[0]['text'] == scrub.Scrubber().scrub(read_fixture())[0]
  assert records[1]['text'] == 'print("hello")\n'
  # drop_document with a category subset: the fixture is dropped from the output.
  proc = run_cli(str(src), '--mode=drop_document', '--categories=email', f'--out={out_path}')
  assert proc.returncode == 0, proc.stderr
  assert [json.loads(line)['name'] for line in out_path.read_text(encoding='utf-8').splitlines()] == ['b.py']


@pytest.mark.parametrize('args, message', [
    (['/nonexistent/corpus'], 'does not exist'),
    (['stdlib', '--mode=nope'], 'scrub.mode must be one of'),
    (['stdlib', '--categories=email,phone'], "unknown category 'phone'"),
])
def test_cli_errors_are_one_line(args, message):
  proc = run_cli(*args)
  assert proc.returncode == 2
  assert message in proc.stderr and 'Traceback' not in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_stdlib_slice_changes_few_documents(scrubber):
  docs = corpus.list_stdlib()
  docs = docs.select(range(min(200, len(docs))), 'first 200')
  touched = 0
  for doc in docs:
    out, counts = scrubber.scrub(doc.text)
    assert (out == doc.text) == (not counts)
    touched += bool(counts)
  # Author emails in headers are the usual finding; most stdlib modules have none.
  assert touched < 0.25 * len(docs)
