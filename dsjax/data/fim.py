"""Fill-in-the-middle (FIM) transformation of a tokenized document (Bavarian et al. 2022, "Efficient Training of
Language Models to Fill in the Middle"), as DeepSeek-Coder and StarCoder train with it.

A document's tokens are cut at two uniformly drawn points into prefix, middle and suffix and rearranged so that the
ordinary left-to-right loss teaches infilling:
  PSM  <prefix> prefix <suffix> suffix <middle> middle
  SPM  <prefix> <suffix> suffix <middle> prefix middle      (the StarCoder/Megatron SPM variant)
The cut is on tokens, not characters (as StarCoder's Megatron `permute`), so no document is re-tokenized. The caller
adds bos/eos around the result; the rate is a per-document probability.
"""
from __future__ import annotations

import numpy as np


def permute(tokens: np.ndarray, fim_ids: tuple[int, int, int], rng: np.random.Generator,
            spm_rate: float = 0.5) -> np.ndarray:
  """The FIM form of `tokens` [n] (int32): PSM, or SPM with probability `spm_rate`; [n + 3] tokens.

  `fim_ids` are the (prefix, suffix, middle) sentinel ids. The two cut points are sorted draws from [0, n], so any
  of the three parts may be empty.
  """
  prefix_id, suffix_id, middle_id = fim_ids
  a, b = np.sort(rng.integers(0, len(tokens) + 1, size=2))
  prefix, middle, suffix = tokens[:a], tokens[a:b], tokens[b:]
  p, s, m = (np.asarray([i], tokens.dtype) for i in (prefix_id, suffix_id, middle_id))
  if rng.random() < spm_rate:
    return np.concatenate([p, s, suffix, m, prefix, middle])
  return np.concatenate([p, prefix, s, suffix, m, middle])
