"""Scrubbing: find secrets and personal data in training text and mask them (or drop the document).

Two detectors, merged per document:
  * detect-secrets (Yelp's maintained scanner): the regexes of its token plugins (AWS, GitHub, GitLab, Slack, Stripe,
    JWT, OpenAI, SendGrid, Basic auth in URLs...), run in-process on the lines that can match, without its global
    settings or files. Its high-entropy-string plugins flag ordinary hashes and test vectors in code, so they are
    opt-in (`high_entropy=True`).
  * rules written here: emails, IPv4 / IPv6 addresses, whole PEM private-key blocks, common API-key shapes and
    password assignments, where only the secret value is masked (`password = "<PASSWORD>"`).
Presidio is not used: its named-entity recognisers need spaCy models that cannot be downloaded here.

Kept on purpose, because a code model should learn them and they identify no one: non-global IP addresses
(loopback, private, link-local, documentation and reserved ranges: 127.0.0.1, 0.0.0.0, 10.x, 192.168.x,
255.255.255.0, ::1, fe80::, 2001:db8::; exactly the ones for which `ipaddress` says `is_global` is False; IPv6 is also
required to be in 2000::/3, the allocated global space), emails at reserved example domains (user@example.com, *.test,
*.invalid, *.example, *.localhost), dotted numbers on a line that mentions a version, and a bare
`-----BEGIN ... PRIVATE KEY-----` header without a key body (as in PEM-parsing code).

Speed: every rule has triggers, literals (`AKIA`, `://`, `@`) or regexes that start with one (`:[0-9A-Fa-f]{0,4}:`),
one of which any match must contain; a rule runs only on the lines holding one, so clean code costs a few scans.

  python -m dsjax.data.scrub stdlib --categories=email,api_key --mode=mask --out=scrubbed.jsonl
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import ipaddress
import json
import re
import sys
from collections.abc import Callable, Sequence

from dsjax.data import corpus

CATEGORIES = ('email', 'ipv4', 'ipv6', 'api_key', 'private_key', 'password')
MODES = ('mask', 'drop_document')
PLACEHOLDERS = {'email': '<EMAIL>', 'ipv4': '<IP_ADDRESS>', 'ipv6': '<IP_ADDRESS>', 'api_key': '<API_KEY>',
                'private_key': '<PRIVATE_KEY>', 'password': '<PASSWORD>'}
# Which category names an overlap when two findings are equally long (earlier wins).
_PRIORITY = {c: i for i, c in enumerate(('private_key', 'api_key', 'password', 'email', 'ipv6', 'ipv4'))}

# detect-secrets secret type -> (our category, which span to mask, triggers, triggers looked up lower-cased).
# Span 'match': the whole regex match; 'group': its non-empty capture groups (the secret value of an assignment or
# URL); 'strip': the match without the delimiters the regex includes. Every match of every regex of the plugin holds
# one of the triggers (see `_Rule`); None runs the plugin on the whole text. Types absent here (a newer
# detect-secrets) run on the whole text as api_key with span 'auto'.
_R = re.compile
_CREDENTIAL_WORDS = ('key', 'pw', 'pass', 'token')  # the keywords of detect-secrets' assignment regexes, lower-cased
_DS_TYPES: dict[str, tuple[str, str, tuple[str | re.Pattern, ...] | None, bool]] = {
    'AWS Access Key': ('api_key', 'group', (_R('a(?:3t|bia|cca|kia|sia|ws)'),), True),
    'Artifactory Credentials': ('api_key', 'strip', (_R('A(?:KC|P[0-9A-F])'),), False),
    'Azure Storage Account access key': ('api_key', 'match', ('AccountKey=',), False),
    'Basic Auth Credentials': ('password', 'group', ('://',), False),
    'Cloudant Credentials': ('api_key', 'group', _CREDENTIAL_WORDS + ('cloudant',), True),
    'Discord Bot Token': ('api_key', 'match', (_R(r'\.[a-zA-Z\d_-]{6}\.[a-zA-Z\d_-]{27}'),), False),
    'GitHub Token': ('api_key', 'match', (_R('gh[opusr]_'),), False),
    'GitLab Token': ('api_key', 'match', (_R('gl(?:pat|dt|ft|soat|rt|cbt|imt|ptt|agent|oas)-'), 'GR1348941'), False),
    'IBM COS HMAC Credentials': ('api_key', 'group', ('key',), True),
    'IBM Cloud IAM Key': ('api_key', 'group', _CREDENTIAL_WORDS, True),
    'JSON Web Token': ('api_key', 'match', ('eyJ',), False),
    'Mailchimp Access Key': ('api_key', 'match', ('-us',), False),
    'NPM tokens': ('api_key', 'group', (':_authToken=',), False),
    'OpenAI Token': ('api_key', 'match', ('T3BlbkFJ',), False),
    'PyPI Token': ('api_key', 'match', ('pypi-AgE',), False),
    'SendGrid API Key': ('api_key', 'match', ('SG.',), False),
    'Slack Token': ('api_key', 'match', ('xox', 'hooks.slack.com'), True),
    'SoftLayer Credentials': ('api_key', 'group', _CREDENTIAL_WORDS + ('softlayer',), True),
    'Square OAuth Secret': ('api_key', 'match', ('sq0csp-',), False),
    'Stripe Access Key': ('api_key', 'match', ('k_live_',), False),
    'Telegram Bot Token': ('api_key', 'match', (_R(r':[0-9A-Za-z_-]{35}'),), False),
    'Twilio API Key': ('api_key', 'match', (_R('AC[a-z0-9]{32}'), _R('SK[a-z0-9]{32}')), False),
}
# Not used: 'Private Key' matches only the BEGIN header (the private_key rule here needs the key body), 'Public IP
# (ipv4)' is the ipv4 rule here, 'Secret Keyword' flags any `secret = x` / `password = f()` in code (the password and
# api_key rules here need a quoted literal value), the high-entropy plugins are added by `high_entropy=True`.
_DS_SKIPPED = frozenset({'Private Key', 'Public IP (ipv4)', 'Secret Keyword', 'Base64 High Entropy String',
                         'Hex High Entropy String'})

_EXAMPLE_EMAIL_DOMAIN = re.compile(r'(?:^|\.)(?:example\.(?:com|org|net)|example|invalid|test|localhost)$',
                                   re.IGNORECASE)
_URL_CREDENTIALS_BEFORE = re.compile(r'://[^\s/@]*:$')
# Dotted numbers on such a line are versions or section numbers (HTML spec 8.2.4.44, RFC 7231 section 7.1.1.1).
_NOT_AN_ADDRESS_WORDS = re.compile(r'version|release|section|\brfc|spec\b|specs\b|§|\bv\d', re.IGNORECASE)
_GLOBAL_IPV6 = ipaddress.IPv6Network('2000::/3')
_PLACEHOLDER_VALUE = re.compile(r'[%{$<(*]|x+$|\.\.\.', re.IGNORECASE)


def _has_letter_and_digit(s: str) -> bool:
  return any(c.isdigit() for c in s) and any(c.isalpha() for c in s)


def _email_ok(line: str, m: re.Match) -> bool:
  domain = m.group(0).rsplit('@', 1)[1]
  return not _EXAMPLE_EMAIL_DOMAIN.search(domain) and not _URL_CREDENTIALS_BEFORE.search(line, 0, m.start())


def _ipv4_ok(line: str, m: re.Match) -> bool:
  if _NOT_AN_ADDRESS_WORDS.search(line):
    return False
  addr = ipaddress.IPv4Address(m.group(0))
  return addr.is_global and not addr.is_multicast


def _ipv6_ok(line: str, m: re.Match) -> bool:
  text = m.group(0)
  if sum(1 for g in re.split(r'[:.]', text) if g) < 3:  # `2000::` in a slice, `a::b`
    return False
  try:
    addr = ipaddress.IPv6Address(text)
  except ValueError:
    return False
  if addr.ipv4_mapped is not None:
    return addr.ipv4_mapped.is_global
  return addr in _GLOBAL_IPV6 and addr.is_global


# The `ok` filters below read the secret value as the last capture group of the match (the whole match if none).
def _token_ok(line: str, m: re.Match) -> bool:
  return _has_letter_and_digit(m.group(m.lastindex or 0))


def _password_ok(line: str, m: re.Match) -> bool:
  return not _PLACEHOLDER_VALUE.match(m.group(m.lastindex or 0))


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One regex: matches in the lines holding a trigger are findings of `category`.

  `triggers`: literals or regexes starting with a literal (fast to scan for), one of which every match contains
  (looked up in the lower-cased text if `ignore_case`); None: run on the whole text.

  `group`: the capture group masked (0: the whole match). `multiline`: run on the whole text (if triggered).
  `ok(line, match)`: an extra filter (IP ranges, example domains, placeholders).
  """
  category: str
  pattern: re.Pattern
  triggers: tuple[str | re.Pattern, ...] | None
  ignore_case: bool = False
  group: int = 0
  multiline: bool = False
  ok: Callable[[str, re.Match], bool] | None = None
  span: str = 'fixed'  # 'fixed': `group`; else a detect-secrets span mode ('match', 'group', 'strip', 'auto')


_PEM_SEP = r"""(?:\\n|[\s"'+,])+"""
_ASSIGN = r"""['"]?\s*(?::=|=>|=|:)\s*(['"])"""  # `key = "`, `"key": "`, `key := '`, `key => "`
_OWN_RULES = (
    # A PEM block: header, optional `Key: value` headers, base64 lines (the first of 16+ characters, so a bare header
    # constant in PEM-parsing code is kept), the END line if there is one. Lines may be separated by real newlines or
    # by `\\n` escapes, quotes and `+` (a key pasted into a string literal).
    _Rule('private_key', re.compile(r'-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----'
                                    rf'(?:{_PEM_SEP}[A-Za-z][A-Za-z-]*: [^\n\\]*)*'
                                    rf'{_PEM_SEP}[A-Za-z0-9+/=]{{16,}}(?:{_PEM_SEP}[A-Za-z0-9+/=]+)*'
                                    rf'(?:{_PEM_SEP}-----END ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----)?'),
          ('-----BEGIN',), multiline=True),
    _Rule('email', re.compile(r'(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@'
                              r'(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w(\[-])'),
          ('@',), ok=_email_ok),
    # Exactly four dotted octets (0-255, no leading zeros): not 3.11.4, not 1.2.3.4.5, not 4.3.2.1.in-addr.arpa.
    _Rule('ipv4', re.compile(r'(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}'
                             r'(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\w)'),
          (re.compile(r'\.\d{1,3}\.\d{1,3}\.'),), ok=_ipv4_ok),
    # Hex groups and colons (one `::` at most, checked by `ipaddress`), optionally ending in a dotted IPv4.
    _Rule('ipv6', re.compile(r'(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?'
                             r'(?![\w:]|\.\w)'),
          (re.compile(r':[0-9A-Fa-f]{0,4}:'),), ok=_ipv6_ok),
    _Rule('api_key', re.compile(r'(?<![\w-])sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}'), ('sk-',), ok=_token_ok),
    _Rule('api_key', re.compile(r'(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255})'),
          (_R('gh[opusr]_'), 'github_pat_')),
    _Rule('api_key', re.compile(r'(?<![\w-])xox[abposr]-[A-Za-z0-9-]{10,}'), ('xox',), ok=_token_ok),
    _Rule('api_key', re.compile(r'(?<![A-Z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Z0-9])'), (_R('A[KS]IA'),)),
    _Rule('api_key', re.compile(r'(?<![\w-])[rs]k_(?:live|test)_[0-9a-zA-Z]{24,}'), ('k_live_', 'k_test_')),
    _Rule('api_key', re.compile(r'(?<![\w-])AIza[0-9A-Za-z_-]{35}(?![\w-])'), ('AIza',)),
    # detect-secrets' JWT regex stops before the signature; this one takes the whole token.
    _Rule('api_key', re.compile(r'(?<![\w-])eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*'), ('eyJ',)),
    _Rule('api_key', re.compile(r'(?i)\bbearer[ \t]+([A-Za-z0-9._~+/-]{20,}=*)'), ('bearer',), ignore_case=True,
          group=1, ok=_token_ok),
    _Rule('api_key', re.compile(r'(?i)(?<![A-Za-z0-9])(?:[A-Za-z0-9]{0,40}[_-]){0,4}(?:api[_-]?key|api[_-]?token|'
                                r'secret[_-]?key|access[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|'
                                r'private[_-]?token)'
                                + _ASSIGN + r'([A-Za-z0-9_\-./+=]{16,})\1'),
          ('key', 'token', 'secret'), ignore_case=True, group=2, ok=_token_ok),
    _Rule('password', re.compile(r'(?i)(?<![A-Za-z0-9])(?:[A-Za-z0-9]{0,40}[_-]){0,4}(?:password|passwd|passphrase|pwd)'
                                 + _ASSIGN + r'''([^'"\s]{3,128})\1'''),
          ('pass', 'pwd'), ignore_case=True, group=2, ok=_password_ok),
    _Rule('password', re.compile(r'''://[^\s/:@'"]+:([^\s/:@'"]+)@'''), ('://',), group=1, ok=_password_ok),
)


def _detect_secrets_rules(high_entropy: bool) -> list[_Rule]:
  """The regexes of detect-secrets' plugins as `_Rule`s (see `_DS_TYPES`)."""
  # detect-secrets loads its plugins on import: imported only when scrubbing.
  from detect_secrets.core.plugins.util import (  # pylint: disable=g-import-not-at-top  (scrubbing only)
      get_mapping_from_secret_type_to_class)
  from detect_secrets.plugins.base import RegexBasedDetector  # pylint: disable=g-import-not-at-top  (scrubbing only)
  from detect_secrets.plugins.high_entropy_strings import (  # pylint: disable=g-import-not-at-top  (scrubbing only)
      HighEntropyStringsPlugin)

  rules = []
  for secret_type, cls in sorted(get_mapping_from_secret_type_to_class().items()):
    if secret_type in _DS_SKIPPED or not issubclass(cls, RegexBasedDetector):
      continue
    category, span, triggers, ignore_case = _DS_TYPES.get(secret_type, ('api_key', 'auto', None, False))
    for pattern in cls.denylist:
      rules.append(_Rule(category, pattern, triggers, ignore_case, span=span))
  if high_entropy:
    for cls in HighEntropyStringsPlugin.__subclasses__():
      plugin = cls()  # default entropy limits; `regex` finds quoted strings of the plugin's charset (group 2)

      def ok(line: str, m: re.Match, plugin=plugin) -> bool:
        return plugin.calculate_shannon_entropy(m.group(2)) > plugin.entropy_limit

      rules.append(_Rule('api_key', plugin.regex, ('"', "'"), group=2, ok=ok))
  return rules


def _spans(rule: _Rule, m: re.Match) -> list[tuple[int, int]]:
  """The spans of `m` to mask (relative to the string `m` was found in)."""
  if rule.span == 'fixed':
    return [m.span(rule.group)]
  groups = [m.span(i) for i in range(1, (m.re.groups or 0) + 1) if m.start(i) >= 0 and m.end(i) > m.start(i)]
  if rule.span == 'group' and groups:
    return groups
  if rule.span == 'auto':
    long_groups = [s for s in groups if s[1] - s[0] >= 8]
    if long_groups:
      return long_groups
  start, end = m.span()
  if rule.span in ('strip', 'auto'):
    s = m.group(0)
    start += len(s) - len(s.lstrip(' \t=:"\''))
    end -= len(s) - len(s.rstrip(' \t=:"\''))
  return [(start, end)] if end > start else []


def _line_bounds(text: str, haystack: str, trigger: str | re.Pattern) -> set[tuple[int, int]]:
  """(start, end) of every line of `text` on which `haystack` (`text` or its lower-cased copy) holds `trigger`."""
  bounds = set()
  if isinstance(trigger, str):
    i = haystack.find(trigger)
  else:
    m = trigger.search(haystack)
    i = -1 if m is None else m.start()
  while i >= 0:
    start = text.rfind('\n', 0, i) + 1
    end = text.find('\n', i)
    if end < 0:
      end = len(text)
    bounds.add((start, end))
    if isinstance(trigger, str):
      i = haystack.find(trigger, end)
    else:
      m = trigger.search(haystack, end)
      i = -1 if m is None else m.start()
  return bounds


@dataclasses.dataclass(frozen=True)
class ScrubConfig:
  """What to scrub. `categories`: a subset of CATEGORIES. `mode`: 'mask' replaces each finding with a placeholder
  (<EMAIL>, <IP_ADDRESS>, <API_KEY>, <PRIVATE_KEY>, <PASSWORD>); 'drop_document' drops any document with a finding.
  `use_detect_secrets`: add detect-secrets' token plugins (api_key; Basic auth URLs -> password). `high_entropy`: add
  its high-entropy-string plugins (as api_key; noisy on code)."""
  categories: tuple[str, ...] = CATEGORIES
  mode: str = 'mask'
  use_detect_secrets: bool = True
  high_entropy: bool = False

  def __post_init__(self):
    if isinstance(self.categories, str):
      raise ValueError(f'scrub.categories must be a sequence of category names, got the string {self.categories!r}')
    object.__setattr__(self, 'categories', tuple(self.categories))
    unknown = [c for c in self.categories if c not in CATEGORIES]
    if unknown:
      raise ValueError(f'scrub.categories: unknown category {unknown[0]!r}; allowed: {", ".join(CATEGORIES)}')
    if self.mode not in MODES:
      raise ValueError(f'scrub.mode must be one of {MODES}, got {self.mode!r}')


class Scrubber:
  """Finds and masks secrets and personal data in a text (see the module docstring for what is found and kept).

  Immutable after construction (compiled regexes only), so one instance can be shared by threads; pickles as its
  config and rebuilds on load. The first construction in a process takes ~0.1 s (importing detect-secrets and its
plugins); later ones ~0.1 ms.
  """

  def __init__(self, config: ScrubConfig | None = None):
    self.config = config if config is not None else ScrubConfig()
    if not isinstance(self.config, ScrubConfig):
      raise TypeError(f'Scrubber expects a ScrubConfig, got {type(self.config).__name__}')
    wanted = set(self.config.categories)
    rules = list(_OWN_RULES)
    if self.config.use_detect_secrets:
      rules += _detect_secrets_rules(self.config.high_entropy)
    self._rules = tuple(r for r in rules if r.category in wanted)

  def __reduce__(self):
    return Scrubber, (self.config,)

  def findings(self, text: str) -> list[tuple[int, int, str]]:
    """Merged findings as sorted, disjoint (start, end, category): overlapping spans are merged into one, named
    after the longest of them."""
    raw = []
    lowered = None
    lines_cache: dict[tuple[str, bool], set[tuple[int, int]]] = {}
    for rule in self._rules:
      if rule.triggers is None:
        regions = [(0, len(text))]
      else:
        if rule.ignore_case and lowered is None:
          lowered = text.lower()
          if len(lowered) != len(text):  # a few non-ASCII letters change length when lower-cased
            lowered = text.translate(_ASCII_LOWER)
        haystack = lowered if rule.ignore_case else text
        if rule.multiline:
          if not any(_contains(haystack, t) for t in rule.triggers):
            continue
          regions = [(0, len(text))]
        else:
          regions = set()
          for trigger in rule.triggers:
            key = (trigger, rule.ignore_case)
            if key not in lines_cache:
              lines_cache[key] = _line_bounds(text, haystack, trigger)
            regions |= lines_cache[key]
      for start, end in regions:
        line = text[start:end] if (start, end) != (0, len(text)) else text
        for m in rule.pattern.finditer(line):
          if rule.ok is not None and not rule.ok(line, m):
            continue
          for s, e in _spans(rule, m):
            if e > s:
              raw.append((start + s, start + e, rule.category))
    return _merge(raw)

  def scrub(self, text: str) -> tuple[str | None, collections.Counter[str]]:
    """(the text with each finding replaced by its placeholder, or None in mode 'drop_document' if anything was
    found; the number of findings per category)."""
    found = self.findings(text)
    counts = collections.Counter(category for _, _, category in found)
    if not found:
      return text, counts
    if self.config.mode == 'drop_document':
      return None, counts
    pieces, pos = [], 0
    for start, end, category in found:
      pieces += [text[pos:start], PLACEHOLDERS[category]]
      pos = end
    pieces.append(text[pos:])
    return ''.join(pieces), counts


def _contains(haystack: str, trigger: str | re.Pattern) -> bool:
  return trigger in haystack if isinstance(trigger, str) else trigger.search(haystack) is not None


_ASCII_LOWER = str.maketrans('ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')


def _merge(raw: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
  """Union overlapping spans; each union is named after its longest member (ties: `_PRIORITY`)."""
  merged = []
  for start, end, category in sorted(raw):
    rank = (end - start, -_PRIORITY[category])
    if merged and start < merged[-1][1]:
      m_start, m_end, m_category, m_rank = merged[-1]
      if rank > m_rank:
        m_category, m_rank = category, rank
      merged[-1] = (m_start, max(m_end, end), m_category, m_rank)
    else:
      merged.append((start, end, category, rank))
  return [(s, e, c) for s, e, c, _ in merged]


def scrub_report(counts: collections.Counter[str], num_documents: int, num_touched: int | None = None) -> str:
  """A small table: findings per category (all of CATEGORIES, zeros included), the total, and the documents."""
  width = max(len(c) for c in CATEGORIES + ('category',))
  lines = [f'{"category":<{width}}  findings']
  lines += [f'{c:<{width}}  {counts.get(c, 0):>8}' for c in CATEGORIES]
  lines.append(f'{"total":<{width}}  {sum(counts.values()):>8}')
  docs = f'documents: {num_documents} scanned'
  if num_touched is not None:
    share = 100.0 * num_touched / num_documents if num_documents else 0.0
    docs += f', {num_touched} with findings ({share:.2f}%)'
  lines.append(docs)
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dsjax.data.scrub', description=__doc__.split('\n')[0])
  parser.add_argument('source', help="'stdlib', a directory, a .jsonl file or a text file")
  parser.add_argument('--categories', default=','.join(CATEGORIES), help='comma-separated subset of ' +
                      ','.join(CATEGORIES))
  parser.add_argument('--mode', default='mask', help=' or '.join(MODES))
  parser.add_argument('--out', default=None, help='write the scrubbed documents here as JSONL {"name", "text"}')
  parser.add_argument('--no_detect_secrets', action='store_true', help="only this module's own rules")
  parser.add_argument('--high_entropy', action='store_true', help="add detect-secrets' high-entropy plugins")
  parser.add_argument('--jsonl_field', default='text')
  parser.add_argument('--include_stdlib_tests', action='store_true')
  args = parser.parse_args(argv)
  try:
    config = ScrubConfig(categories=tuple(c.strip() for c in args.categories.split(',') if c.strip()),
                         mode=args.mode, use_detect_secrets=not args.no_detect_secrets, high_entropy=args.high_entropy)
    docs = corpus.list_documents(args.source, include_stdlib_tests=args.include_stdlib_tests,
                                 jsonl_field=args.jsonl_field)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  scrubber = Scrubber(config)
  total: collections.Counter[str] = collections.Counter()
  touched = 0
  out = open(args.out, 'w', encoding='utf-8') if args.out else None
  try:
    for doc in docs:
      text, counts = scrubber.scrub(doc.text)
      total += counts
      touched += bool(counts)
      if out is not None and text is not None:
        out.write(json.dumps({'name': doc.name, 'text': text}, ensure_ascii=False) + '\n')
  except ValueError as e:  # a bad JSON line
    print(f'error: {e}', file=sys.stderr)
    return 2
  finally:
    if out is not None:
      out.close()
  print(f'{docs.description}: mode {config.mode}')
  print(scrub_report(total, len(docs), touched))
  if args.out:
    print(f'wrote {len(docs) - (touched if config.mode == "drop_document" else 0)} documents to {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
