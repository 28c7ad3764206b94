"""Chat messages -> prompt token ids: the tokenizer's jinja chat template, or a built-in fallback."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from dsjax.serve.errors import APIError


def builtin_chat_text(messages: Sequence[dict[str, str]]) -> str:
  """The fallback template: 'System: ...\\n\\nUser: ...\\n\\nAssistant: ...' ending with an open assistant turn."""
  return ''.join(f'{m["role"].capitalize()}: {m["content"]}\n\n' for m in messages) + 'Assistant:'


class ChatFormatter:
  """Messages -> prompt token ids: the tokenizer's jinja chat template if given (and jinja2 importable), else
  `builtin_chat_text`. Special-token strings in the rendered text (bos/eos of a HF tokenizer) become their ids."""

  def __init__(self, tokenizer: Any, chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.template = None
    if chat_template:
      try:
        import jinja2  # pylint: disable=g-import-not-at-top  (optional: chat templates only)
        from jinja2 import sandbox  # pylint: disable=g-import-not-at-top  (optional: chat templates only)
        env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals['raise_exception'] = _raise_template_error
        self.template = env.from_string(chat_template)
      except (ImportError, jinja2.TemplateError):  # pylint: disable=used-before-assignment
        self.template = None
    self.specials = {name: getattr(tokenizer, f'{role}_id') for role in ('bos', 'eos')
                     if (name := getattr(tokenizer, f'{role}_token', None))}

  def __call__(self, messages: Sequence[dict[str, str]]) -> list[int]:
    if self.template is None:
      return [self.tokenizer.bos_id] + self._encode(builtin_chat_text(messages))
    import jinja2  # pylint: disable=g-import-not-at-top  (imported when the template was compiled)
    try:
      text = self.template.render(messages=list(messages), add_generation_prompt=True,
                                  bos_token=self._name('bos'), eos_token=self._name('eos'))
    except jinja2.TemplateError as e:  # the template rejects these messages (sandbox limits included)
      raise APIError(400, f'chat template: {e}', param='messages') from None
    ids = self._encode_with_specials(text)
    return ids if ids[:1] == [self.tokenizer.bos_id] else [self.tokenizer.bos_id] + ids

  def _name(self, role: str) -> str:
    return getattr(self.tokenizer, f'{role}_token', '') or ''

  def _encode(self, text: str) -> list[int]:
    return [int(t) for t in self.tokenizer.encode(text)] if text else []

  def _encode_with_specials(self, text: str) -> list[int]:
    ids, rest = [], text
    while rest:
      hits = [(rest.find(name), name) for name in self.specials if name in rest]
      if not hits:
        return ids + self._encode(rest)
      at, name = min(hits)
      ids += self._encode(rest[:at]) + [self.specials[name]]
      rest = rest[at + len(name):]
    return ids


def _raise_template_error(message: str) -> None:
  raise APIError(400, f'chat template: {message}')



def read_chat_template(directory: str) -> str | None:
  """`chat_template` of the checkpoint's tokenizer_config.json (the 'default' one of a list), if any."""
  path = os.path.join(directory, 'tokenizer_config.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    template = json.load(f).get('chat_template')
  if isinstance(template, list):
    named = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
    template = named.get('default') or next(iter(named.values()), None)
  return template if isinstance(template, str) else None
