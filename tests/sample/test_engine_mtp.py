"""The continuous-batching engine drafting with the model's own multi-token-prediction depth (MtpDrafter): greedy
requests of a latent-attention + MoE + MTP model equal plain greedy decoding of each prompt alone, and a seeded
sampled request equals `speculative_generate` of its prompt alone with the same seed."""
import jax
import jax.numpy as jnp
import pytest

from dsjax.model import Transformer
from dsjax.sample import engine as engine_lib
from dsjax.sample import sampler as sampler_lib
from dsjax.sample import speculative
from tests.model import helpers
from tests.sample.test_engine import VOCAB_LIMIT, Reference, prompt_of

MAX_LEN = 40


def tiny_deepseek():
  cfg = helpers.tiny_config('full', vocab_size=384, num_kv_heads=4)
  cfg.mla.update(dict(kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5))
  cfg.moe.update(dict(num_experts=4, num_shared_experts=1, expert_dim=16, top_k=2, first_dense_layers=1,
                      scoring='sigmoid', topk_method='noaux_tc', num_groups=2, topk_groups=1, norm_topk_prob=True))
  cfg.mtp.num_layers = 1
  model = Transformer(cfg)
  shapes = helpers.init_shapes(model, jnp.zeros((1, 8), jnp.int32), jnp.arange(8, dtype=jnp.int32)[None])
  return model, helpers.random_like(shapes, seed=2, std=0.5)


@pytest.mark.slow  # ~100 s on 2 busy cores; tests/sample/test_speculative.py covers MtpDrafter by default
def test_engine_with_the_mtp_drafter_matches_greedy_and_speculative_sampling():
  model, params = tiny_deepseek()
  reference = Reference(model, params, MAX_LEN)
  drafter = speculative.make_drafter('mtp', model.cfg, max_len=MAX_LEN, gamma=2, target_model=model,
                                     target_params=params)
  engine = engine_lib.Engine(model, params, num_slots=2, max_len=MAX_LEN, vocab_limit=VOCAB_LIMIT, drafter=drafter,
                             gamma=2)
  try:
    prompts = [prompt_of(n, offset=i) for i, n in enumerate([6, 1, 13])]
    requests = [engine.submit(p, 8, stop_ids=[]) for p in prompts]
    sampled_prompt = prompt_of(9, offset=4)
    settings = dict(temperature=1.0, top_k=50, top_p=0.9)
    sampled = engine.submit(sampled_prompt, 8, seed=3, **settings)
    for prompt, request in zip(prompts, requests):
      assert request.result(timeout=120) == reference(prompt, 8), len(prompt)
    target = sampler_lib.Sampler(model, max_len=MAX_LEN, extra_slots=3)
    alone, _ = speculative.speculative_generate(target, params, drafter, [sampled_prompt], jax.random.key(3),
                                                max_new_tokens=8, gamma=2, vocab_limit=VOCAB_LIMIT, **settings)
    assert sampled.result(timeout=120) == alone[0]
    assert engine.stats()['proposed'] > 0
  finally:
    engine.shutdown(cancel=True)
