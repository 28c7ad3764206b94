"""Text in, text out: completions of string prompts with a tokenizer, and the end-of-training samples hook."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections

from dsjax import lora
from dsjax import sharding as sharding_lib
from dsjax.sample import sampler


def complete(model: Any, params: Any, tokenizer: Any, prompts: Sequence[str], rng: jax.Array,
             sample_cfg: ml_collections.ConfigDict, placement: sharding_lib.Placement | None = None) -> list[str]:
  """Text completions of `prompts` (each starts a new document, so it is prefixed with BOS) with the `sample`
  config section's settings; `placement`: the mesh the params live on."""
  encoded = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
  new_tokens = sampler.generate(
      model, params, encoded, rng, max_new_tokens=sample_cfg.max_new_tokens, temperature=sample_cfg.temperature,
      top_k=sample_cfg.top_k, top_p=sample_cfg.top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
      vocab_limit=tokenizer.vocab_size, placement=placement)
  return [tokenizer.decode(t) for t in new_tokens]


class Samples:
  """A training-loop hook (dsjax/train/hooks.py): at the end of the run, `train.num_samples` completions of
  `train.sample_prompts`, printed and kept as `summary['samples']` (single-process runs)."""

  def on_step(self, run: Any, step: int) -> None:
    del run, step

  def on_end(self, run: Any) -> None:
    cfg = run.cfg
    if not cfg.train.num_samples or jax.process_count() != 1:
      return
    prompts = [cfg.train.sample_prompts[i % len(cfg.train.sample_prompts)] for i in range(cfg.train.num_samples)]
    rng = jax.random.split(jax.random.key(cfg.seed), 3)[2]  # the run's third stream (init, dropout, samples)
    model, params = lora.plain_model(run.model, run.state.params)
    run.summary['samples'] = texts = complete(model, params, run.tokenizer, prompts, rng, cfg.sample, run.placement)
    for i, (prompt, text) in enumerate(zip(prompts, texts), 1):
      run.say(f'--- sample {i}/{len(texts)} ---\n{prompt}{text}')
