"""The attention dispatch (dsjax/model/dispatch.py) against a table written here: for every platform x dtype x
mask x packing x decoding combination, the path impl='auto' picks; forced impls and their errors."""
import itertools

import pytest

from dsjax.model import dispatch
from dsjax.model.dispatch import AttentionCall


def expected_auto(platform, dtype, mask, packed, cached):
  """The rule, restated: CPU reference; TPU Mosaic kernels; GPU cuDNN for bf16/fp16 self-attention of one document
  per row under a causal or pure-window mask, the Pallas kernels for everything else."""
  if platform == 'cpu':
    return 'reference'
  if platform == 'tpu':
    return 'pallas'
  cudnn = dtype in ('bfloat16', 'float16') and mask in ('causal', 'window') and not packed and not cached
  return 'cudnn' if cudnn else 'pallas'


# The same rule as an explicit table for the GPU rows, so a change to either shows up here.
GPU_CUDNN_ROWS = {  # (dtype, mask) of uncached, unpacked calls that cuDNN takes
    ('bfloat16', 'causal'), ('bfloat16', 'window'), ('float16', 'causal'), ('float16', 'window'),
}

COMBOS = list(itertools.product(dispatch.PLATFORMS, ('float32', 'bfloat16', 'float16'), dispatch.MASKS,
                                (False, True), (False, True)))


@pytest.mark.parametrize('platform, dtype, mask, packed, cached', COMBOS)
def test_auto_table(platform, dtype, mask, packed, cached):
  call = AttentionCall(platform=platform, dtype=dtype, mask=mask, packed=packed, cached=cached)
  got = dispatch.choose('auto', call)
  assert got == expected_auto(platform, dtype, mask, packed, cached)
  if platform == 'gpu':
    assert (got == 'cudnn') == ((dtype, mask) in GPU_CUDNN_ROWS and not packed and not cached)


@pytest.mark.parametrize('platform', dispatch.PLATFORMS)
def test_routed_heads_and_long_heads_never_go_to_cudnn(platform):
  for call in (AttentionCall(platform=platform, dtype='bfloat16', mask='causal', packed=False, routed=True),
               AttentionCall(platform=platform, dtype='bfloat16', mask='causal', packed=False, head_dim=256),
               AttentionCall(platform=platform, dtype='bfloat16', mask='causal', packed=False, head_dim=36)):
    assert dispatch.choose('auto', call) == ('reference' if platform == 'cpu' else 'pallas')


def test_transformer_xl_is_reference_everywhere():
  for platform in dispatch.PLATFORMS:
    call = AttentionCall(platform=platform, dtype='bfloat16', mask='causal', packed=False, relative=True)
    assert dispatch.choose('auto', call) == 'reference'
    with pytest.raises(ValueError, match='impl.*pallas'):
      dispatch.choose('pallas', call)


def test_forced_impls():
  gpu_dense = AttentionCall(platform='gpu', dtype='bfloat16', mask='window', packed=False)
  for platform in dispatch.PLATFORMS:
    call = AttentionCall(platform=platform, dtype='float32', mask='window+global', cached=True)
    assert dispatch.choose('reference', call) == 'reference'
    assert dispatch.choose('pallas', call) == 'pallas'  # on CPU: the kernels in interpret mode
  assert dispatch.choose('cudnn', gpu_dense) == 'cudnn'
  with pytest.raises(ValueError, match='impl') as error:
    dispatch.choose('cudnn', AttentionCall(platform='gpu', dtype='float32', mask='window+global', cached=True))
  for limit in ('global', 'KV cache', 'float32', 'packed'):
    assert limit in str(error.value)
  with pytest.raises(ValueError, match='GPUs only'):
    dispatch.choose('cudnn', AttentionCall(platform='tpu', dtype='bfloat16', mask='causal', packed=False))
  with pytest.raises(ValueError, match='unknown'):
    dispatch.choose('flash', gpu_dense)


def test_call_description_rejects_unknown_values():
  with pytest.raises(ValueError, match='platform'):
    AttentionCall(platform='metal', dtype='float32', mask='causal')
  with pytest.raises(ValueError, match='mask'):
    AttentionCall(platform='cpu', dtype='float32', mask='dense')
