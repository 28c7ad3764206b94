"""Multiple-choice scoring by log-likelihood, for MMLU-format JSONL files.

One record per line: {"question": str, "choices": [str, ...] (2 or more), "answer": index or letter ("A".."Z")},
optionally "subject". Each choice is scored by the log-likelihood of " <choice>" after the prompt
"Question: <question>\\nAnswer:": the sum over its tokens (`accuracy`) and the mean per token (`accuracy_norm`,
which does not favour short choices). tests/fixtures/mmlu_tiny.jsonl is a small example; a real MMLU export in the
same format (e.g. one file per split) works unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import string
from typing import Any, Sequence

from flax import linen as nn
import numpy as np

from dsjax.eval import scoring


class FormatError(ValueError):
  """A malformed multiple-choice record; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  choices: tuple[str, ...]
  answer: int
  subject: str = ''


def prompt_text(question: str) -> str:
  return f'Question: {question}\nAnswer:'


def parse_record(record: Any, where: str) -> Question:
  """One JSON record -> Question; raises FormatError prefixed with `where` ('file:line')."""
  def fail(why: str):
    raise FormatError(f'{where}: {why}')

  if not isinstance(record, dict):
    fail(f'expected a JSON object, got {type(record).__name__}')
  for key in ('question', 'choices', 'answer'):
    if key not in record:
      fail(f'missing field {key!r} (need "question", "choices", "answer")')
  question, choices, answer = record['question'], record['choices'], record['answer']
  if not isinstance(question, str):
    fail('"question" must be a string')
  if (not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices)):
    fail('"choices" must be a list of at least 2 strings')
  if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in string.ascii_uppercase:
    answer = string.ascii_uppercase.index(answer.strip().upper())
  if isinstance(answer, bool) or not isinstance(answer, int):
    fail(f'"answer" must be a choice index or a letter, got {answer!r}')
  if not 0 <= answer < len(choices):
    fail(f'"answer" {record["answer"]!r} is out of range for {len(choices)} choices')
  return Question(question, tuple(choices), answer, str(record.get('subject', '')))


def load_jsonl(path: str) -> list[Question]:
  """The questions of an MMLU-format JSONL file (blank lines skipped)."""
  questions = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise FormatError(f'{path}:{lineno}: not valid JSON ({e.msg})') from e
      questions.append(parse_record(record, f'{path}:{lineno}'))
  if not questions:
    raise FormatError(f'{path}: no records')
  return questions


def encode_pair(tokenizer, question: str, choice: str, max_len: int) -> tuple[list[int], int]:
  """Tokens [bos] + prompt + " choice" (left-cut to `max_len` + 1 tokens) and how many of them are the choice."""
  context = [int(tokenizer.bos_id)] + [int(t) for t in tokenizer.encode(prompt_text(question))]
  continuation = [int(t) for t in tokenizer.encode(' ' + choice)]
  tokens = (context + continuation)[-(max_len + 1):]
  return tokens, min(len(continuation), len(tokens) - 1)


def choice_log_likelihoods(model: nn.Module, params: Any, tokenizer, questions: Sequence[Question], *,
                           max_len: int | None = None, batch_size: int = 16) -> list[list[tuple[float, int]]]:
  """For each question, for each choice: (sum of the choice tokens' log-probabilities in nats, number of tokens).

  Each (question, choice) pair is one row [bos, prompt..., choice...] scored by one full causal forward pass
  (scoring.continuation_log_likelihoods).
  """
  max_len = int(max_len or model.cfg.max_positions)
  rows, owners = [], []
  for q_index, q in enumerate(questions):
    for c_index, choice in enumerate(q.choices):
      rows.append(encode_pair(tokenizer, q.question, choice, max_len))
      owners.append((q_index, c_index))
  sums = scoring.continuation_log_likelihoods(model, params, rows, pad_id=int(tokenizer.pad_id),
                                              batch_size=batch_size)
  result: list[list[tuple[float, int]]] = [[] for _ in questions]
  for (q_index, _), value, (_, n_choice) in zip(owners, sums, rows):
    result[q_index].append((float(value), n_choice))
  return result


def evaluate(model: nn.Module, params: Any, tokenizer, questions: Sequence[Question], *, max_len: int | None = None,
             batch_size: int = 16) -> dict[str, Any]:
  """Accuracy of the highest-likelihood choice: `accuracy` (sum of log-probabilities), `accuracy_norm` (mean per
  token), `count`, `predictions` (argmax of the sum per question) and, when records name one, `by_subject`."""
  scores = choice_log_likelihoods(model, params, tokenizer, questions, max_len=max_len, batch_size=batch_size)
  predictions = [int(np.argmax([s for s, _ in per_choice])) for per_choice in scores]
  predictions_norm = [int(np.argmax([s / max(n, 1) for s, n in per_choice])) for per_choice in scores]
  correct = [p == q.answer for p, q in zip(predictions, questions)]
  correct_norm = [p == q.answer for p, q in zip(predictions_norm, questions)]
  result: dict[str, Any] = {'accuracy': float(np.mean(correct)), 'accuracy_norm': float(np.mean(correct_norm)),
                            'count': len(questions), 'predictions': predictions}
  subjects = sorted({q.subject for q in questions if q.subject})
  if subjects:
    result['by_subject'] = {s: float(np.mean([c for c, q in zip(correct, questions) if q.subject == s]))
                            for s in subjects}
  return result


def evaluate_file(model: nn.Module, params: Any, tokenizer, path: str, **kwargs: Any) -> dict[str, Any]:
  """`evaluate` on the questions of an MMLU-format JSONL file."""
  return {'file': path, **evaluate(model, params, tokenizer, load_jsonl(path), **kwargs)}
