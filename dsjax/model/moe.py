"""DeepSeekMoE (DeepSeek-V2 section 2.2, DeepSeek-V3 section 2.1.2): shared experts plus fine-grained routed experts.

  y = shared(x) + sum_{i in TopK(x)} g_i(x) * SwiGLU_i(x)

Routing (pure functions, testable alone): router logits in float32 -> scores (softmax: V2; sigmoid: V3) ->
selection of `top_k` experts (greedy; group_limited_greedy: V2, groups ranked by their best score; noaux_tc: V3,
groups ranked by the sum of their two best bias-corrected scores, the correction bias selecting but never weighting)
-> weights = the selected scores [renormalised to sum to 1] x routed_scaling_factor.

Compute is dropless: the N*k (token, expert) pairs are sorted by expert, the token rows gathered, and each expert's
contiguous block multiplied by its weights with `jax.lax.ragged_dot` (grouped matmul): no capacity, no dropped token,
static shapes (always N*k rows).

Load balance: `balance_loss` is DeepSeek-V3's complementary sequence-wise loss (eq. 17-20), and the auxiliary-loss-free
correction bias (noaux_tc) is updated by composition: the MoE output passes through a `custom_vjp` identity whose
backward hands the bias, as its "gradient", the batch's expert load minus its mean; dsjax/train/optimizer.py sends
that leaf to sign() x -rate instead of AdamW, i.e. bias_i += rate * sign(mean_load - load_i) once per step.

Ties in scores are broken by the lower index (jax.lax.top_k). torch.topk guarantees no order among ties (on CPU it
picks neither the lowest nor the highest index consistently), so exact ties are where HF and dsjax may differ.
Weights follow DeepSeek-V3 for every method (normalise if norm_topk_prob, then scale). transformers' V2 router never
normalises, and DeepSeek's own V2 code scales only when it does not normalise; the published V2 models set
norm_topk_prob=False, where all three agree.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections

from dsjax import config as config_lib
from dsjax.model import partitioning

from dsjax.model.layers import MLP, normal_init, to_dtype

SCORINGS = ('softmax', 'sigmoid')
TOPK_METHODS = ('greedy', 'group_limited_greedy', 'noaux_tc')
BIAS_NAME = 'e_score_correction_bias'  # the optimizer finds the correction bias by this leaf name


# ---------------------------------------------------------------- routing


def expert_scores(logits_NE: jax.Array, scoring: str) -> jax.Array:
  """Router logits [..., E] -> float32 affinity scores [..., E]: softmax over experts (V2) or sigmoid (V3)."""
  logits_NE = logits_NE.astype(jnp.float32)
  if scoring == 'softmax':
    return jax.nn.softmax(logits_NE, axis=-1)
  if scoring == 'sigmoid':
    return jax.nn.sigmoid(logits_NE)
  raise ValueError(f'scoring must be one of {SCORINGS}, got {scoring!r}')


def _group_mask(choice_NE: jax.Array, num_groups: int, topk_groups: int, method: str) -> jax.Array:
  """bool [N, E]: the experts of the `topk_groups` best groups of each token (ranked as `method` ranks them)."""
  n, e = choice_NE.shape
  grouped_NGS = choice_NE.reshape(n, num_groups, e // num_groups)
  if method == 'group_limited_greedy':  # V2: a group's best expert
    group_NG = grouped_NGS.max(axis=-1)
  else:  # noaux_tc (V3): the sum of a group's two best (bias-corrected) scores
    group_NG = jax.lax.top_k(grouped_NGS, min(2, e // num_groups))[0].sum(axis=-1)
  _, chosen_NC = jax.lax.top_k(group_NG, topk_groups)  # C = topk_groups chosen groups
  keep_NG = jnp.any(chosen_NC[:, :, None] == jnp.arange(num_groups), axis=1)
  return jnp.repeat(keep_NG, e // num_groups, axis=-1)


def select_experts(scores_NE: jax.Array, top_k: int, method: str = 'greedy', num_groups: int = 1,
                   topk_groups: int = 1, bias_E: jax.Array | None = None) -> jax.Array:
  """The `top_k` experts of each token: int32 [N, k], in decreasing order of the choice score.

  Args:
    scores_NE: float32 [N, E] affinity scores.
    method: greedy (top_k of the scores) | group_limited_greedy (V2: only experts of the `topk_groups` groups with the
      highest max score) | noaux_tc (V3: choice = scores + bias_E, groups ranked by the sum of their top-2 choices).
    bias_E: float32 [E], the correction bias; used (only for the choice) by noaux_tc.
  Ties go to the lower expert (and group) index.
  """
  if method not in TOPK_METHODS:
    raise ValueError(f'topk_method must be one of {TOPK_METHODS}, got {method!r}')
  choice_NE = scores_NE
  if method == 'noaux_tc' and bias_E is not None:
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
  if method != 'greedy' and topk_groups < num_groups:
    # Masked experts get -inf (HF V2 fills 0.0: the same choice unless an allowed score underflowed to 0).
    choice_NE = jnp.where(_group_mask(choice_NE, num_groups, topk_groups, method), choice_NE, -jnp.inf)
  return jax.lax.top_k(choice_NE, top_k)[1].astype(jnp.int32)


def route(scores_NE: jax.Array, top_k: int, method: str = 'greedy', num_groups: int = 1, topk_groups: int = 1,
          bias_E: jax.Array | None = None, norm_topk_prob: bool = False,
          routed_scaling_factor: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """scores float32 [N, E] -> (expert indices int32 [N, k], weights float32 [N, k]).

  The weights are the selected experts' scores (never the bias-corrected ones), divided by their sum (+1e-20, as
  DeepSeek-V3) with `norm_topk_prob`, then multiplied by `routed_scaling_factor`. Gradients reach the scores through
  the weights; the selection itself is piecewise constant.
  """
  idx_NK = select_experts(scores_NE, top_k, method, num_groups, topk_groups, bias_E)
  w_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
  if norm_topk_prob:
    w_NK = w_NK / (w_NK.sum(axis=-1, keepdims=True) + 1e-20)
  return idx_NK, w_NK * routed_scaling_factor


def expert_load(idx_NK: jax.Array, valid_N: jax.Array, num_experts: int) -> jax.Array:
  """float32 [E]: the number of valid tokens routed to each expert (sums to k x valid tokens)."""
  weights = jnp.broadcast_to(valid_N[:, None], idx_NK.shape).astype(jnp.float32)
  return jnp.zeros((num_experts,), jnp.float32).at[idx_NK.reshape(-1)].add(weights.reshape(-1))


def balance_loss(scores_BTE: jax.Array, idx_BTK: jax.Array, valid_BT: jax.Array) -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss (eq. 17-20) without its weight alpha: float32 scalar.

  Per row (sequence) b, over its T_b valid tokens: f_i = E / (k T_b) * #{t: i in TopK_t} (no gradient),
  P_i = (1 / T_b) sum_t s_it / sum_j s_jt, L_b = sum_i f_i P_i; the loss is the mean of L_b over rows with a valid
  token. 1.0 when every row spreads its tokens evenly, up to E / k when a row sends every token to the same k experts.
  """
  e, k = scores_BTE.shape[-1], idx_BTK.shape[-1]
  w_BT = valid_BT.astype(jnp.float32)
  n_B = w_BT.sum(axis=-1)
  normalised_BTE = scores_BTE / scores_BTE.sum(axis=-1, keepdims=True)
  p_BE = jnp.einsum('BTE,BT->BE', normalised_BTE, w_BT) / jnp.maximum(n_B, 1.0)[:, None]
  counts_BE = jnp.einsum('BTKE,BT->BE', jax.nn.one_hot(idx_BTK, e, dtype=jnp.float32), w_BT)
  f_BE = jax.lax.stop_gradient(counts_BE * e / (k * jnp.maximum(n_B, 1.0))[:, None])
  has_tokens_B = (n_B > 0).astype(jnp.float32)
  return jnp.sum((f_BE * p_BE).sum(axis=-1) * has_tokens_B) / jnp.maximum(has_tokens_B.sum(), 1.0)


def expert_load_stats(load: jax.Array) -> dict[str, jax.Array]:
  """Balance statistics of an expert load [..., E] (e.g. [layers, E] from a scanned stack), each [...]:
  max_over_mean (1 = uniform; the paper's MaxVio is this minus 1), min_over_mean, cv (std / mean) and
  unused_fraction (share of experts that got no token)."""
  load = jnp.asarray(load, jnp.float32)
  mean = jnp.maximum(load.mean(axis=-1), 1e-9)
  return {'max_over_mean': load.max(axis=-1) / mean, 'min_over_mean': load.min(axis=-1) / mean,
          'cv': load.std(axis=-1) / mean, 'unused_fraction': (load == 0).mean(axis=-1)}


# ---------------------------------------------------------------- dropless expert compute

# A routed experts' weight is a float array [E, K, M] or a *grouped weight*: a pytree (e.g. dsjax.quant.QTensor, or
# dsjax/lora.py's adapted weight) with
#   ragged_dot(x [R, K], group_sizes [E], preferred_element_type=None, shard=None) -> [R, M]  (what jax.lax.ragged_dot
#     computes with the float weight; `shard`: an int32 index that differs between the shards of an expert_parallel
#     shard_map that receive different rows, None outside one; for randomness)
#   shard_map_specs(spec) -> the same pytree with a PartitionSpec per array, for a weight split like `spec`
# and whose first leaf leads with the experts axis. No module of the model knows the concrete types.


def num_experts_of(w: Any) -> int:
  """The experts (leading axis) of a routed experts' weight: a float array or a grouped weight."""
  return jax.tree_util.tree_leaves(w)[0].shape[0]


def grouped_matmul(x_RK: jax.Array, w: Any, group_sizes_E: jax.Array, preferred_element_type: Any = None,
                   shard: jax.Array | None = None) -> jax.Array:
  """Rows of x [R, K] sorted by expert times their expert's weight (w [E, K, M] or a grouped weight) -> [R, M]: the
  first group_sizes_E[0] rows by expert 0, and so on; rows past the groups give zeros. In x's dtype unless
  preferred_element_type."""
  if hasattr(w, 'ragged_dot'):
    return w.ragged_dot(x_RK, group_sizes_E, preferred_element_type=preferred_element_type or x_RK.dtype,
                        shard=shard)
  return jax.lax.ragged_dot(x_RK, w.astype(x_RK.dtype), group_sizes_E, preferred_element_type=preferred_element_type)


def shard_map_specs_of(w: Any, spec: P) -> Any:
  """shard_map in_specs of a routed experts' weight split like `spec` ([E, K, M]): `spec` for a float array."""
  return w.shard_map_specs(spec) if hasattr(w, 'shard_map_specs') else spec


def routed_experts(x_ND: jax.Array, idx_NK: jax.Array, w_NK: jax.Array, gate_EDF: Any, up_EDF: Any,
                   down_EFD: Any) -> jax.Array:
  """sum_k w_NK * SwiGLU_{idx_NK}(x_ND), float32 [N, D], every (token, expert) pair computed (dropless).

  The N*k pairs are sorted by expert (stable: by token within an expert), the token rows gathered in that order and
  multiplied expert block by expert block with ragged_dot (group sizes = tokens per expert); the rows return to
  (token, slot) order by the inverse permutation and are summed over the k slots. Matmuls run in x's dtype, the
  down projection accumulates into float32 and the weighted sum is float32. The weights are float arrays or grouped
  weights (see `grouped_matmul`: quantized experts, LoRA-adapted experts).
  """
  n, k = idx_NK.shape
  e = num_experts_of(gate_EDF)
  flat_M = idx_NK.reshape(-1)  # M = N*k pairs, pair m = (token m // k, slot m % k)
  order_M = jnp.argsort(flat_M, stable=True)
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(n * k, dtype=order_M.dtype))
  group_sizes_E = jnp.bincount(flat_M, length=e).astype(jnp.int32)
  xs_MD = jnp.take(x_ND, order_M // k, axis=0)
  gate_MF = grouped_matmul(xs_MD, gate_EDF, group_sizes_E)
  up_MF = grouped_matmul(xs_MD, up_EDF, group_sizes_E)
  h_MF = nn.silu(gate_MF) * up_MF
  out_MD = grouped_matmul(h_MF, down_EFD, group_sizes_E, preferred_element_type=jnp.float32)
  out_NKD = jnp.take(out_MD, inverse_M, axis=0).reshape(n, k, -1)
  return jnp.einsum('NKD,NK->ND', out_NKD, w_NK.astype(jnp.float32))


# ---------------------------------------------------------------- expert parallelism


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
  """How the routed experts split over the mesh in context: tokens over `batch` axes, experts over `expert` axes,
  each expert's inner dimension over `mlp` axes."""
  batch: tuple[str, ...]
  expert: tuple[str, ...]
  mlp: tuple[str, ...]


def expert_parallel_plan(num_tokens: int, num_experts: int) -> ExpertPlan | None:
  """The plan for the mesh and logical rules in context, or None (no mesh, or experts not split over it: XLA
  partitions `routed_experts` like any other computation)."""
  mesh = partitioning.context_mesh()
  if mesh is None:
    return None
  expert = partitioning.mesh_axes('experts', mesh)
  if not expert:
    return None
  size = lambda axes: math.prod(mesh.shape[a] for a in axes)
  if num_experts % size(expert):
    raise config_lib.ConfigError(f'config.model.moe.num_experts={num_experts}: the mesh splits experts over '
                                 f'{expert} ({size(expert)} devices, config.mesh.expert), which must divide it')
  batch = partitioning.mesh_axes('batch', mesh)
  if num_tokens % size(batch):
    batch = ()  # e.g. decoding one row: every device routes the same tokens
  return ExpertPlan(batch, expert, partitioning.mesh_axes('mlp', mesh))


def expert_parallel(plan: ExpertPlan):
  """`routed_experts` with experts split over `plan.expert`: per shard (`shard_map`), each device routes its tokens,
  sends every (token, expert) pair to the device holding that expert (`all_to_all`), runs its local experts with
  the grouped matmul and sends the results back, where the k results of a token are summed with their weights.

  Dropless with static shapes: a device may receive up to all of every sender's pairs, so each send buffer has a
  slot for each of its N*k pairs per destination (XLA:CPU has no ragged all-to-all; slots past a destination's
  pairs carry the "no expert" id and are skipped by the grouped matmul, whose rows beyond its groups are zero).
  Expert weights arrive gathered over the fsdp axes (their `embed` dimension) by the shard_map's input specs;
  with the expert inner dimension split over `plan.mlp`, the partial down projections are summed there.
  """
  expert_axis = plan.expert if len(plan.expert) > 1 else plan.expert[0]
  spec = lambda *dims: P(*(d or None for d in dims))

  def per_shard(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD):
    n, k = idx_NK.shape
    e_local, d = num_experts_of(gate_EDF), x_ND.shape[-1]
    # Shards that receive different rows (not the mlp ones: they hold slices of the same experts for the same rows).
    shard = jax.lax.axis_index(plan.batch + plan.expert)
    ep = jax.lax.psum(1, expert_axis)
    pairs = n * k
    expert_M = idx_NK.reshape(-1)
    order_M = jnp.argsort(expert_M, stable=True)  # pairs grouped by destination device, by expert within it
    expert_S = expert_M[order_M]
    dest_S = expert_S // e_local
    counts = jnp.bincount(dest_S, length=ep)
    slot_S = jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[dest_S]
    send_x = jnp.zeros((ep, pairs, d), x_ND.dtype).at[dest_S, slot_S].set(jnp.take(x_ND, order_M // k, axis=0))
    send_e = jnp.full((ep, pairs), e_local, jnp.int32).at[dest_S, slot_S].set(expert_S - dest_S * e_local)
    recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0, tiled=True).reshape(ep * pairs, d)
    recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0, tiled=True).reshape(ep * pairs)
    # This device's experts over the rows it received, grouped by local expert ("no expert" rows last).
    order_R = jnp.argsort(recv_e, stable=True)
    sizes = jnp.bincount(recv_e, length=e_local + 1)[:e_local].astype(jnp.int32)
    xs_RD = jnp.take(recv_x, order_R, axis=0)
    h_RF = (nn.silu(grouped_matmul(xs_RD, gate_EDF, sizes, shard=shard))
            * grouped_matmul(xs_RD, up_EDF, sizes, shard=shard))
    out_RD = grouped_matmul(h_RF, down_EFD, sizes, preferred_element_type=jnp.float32, shard=shard)
    if plan.mlp:
      out_RD = jax.lax.psum(out_RD, plan.mlp)
    out_RD = jnp.zeros_like(out_RD).at[order_R].set(out_RD)
    back = jax.lax.all_to_all(out_RD.reshape(ep, pairs, d), expert_axis, 0, 0, tiled=True)
    out_M = jnp.zeros((pairs, d), jnp.float32).at[order_M].set(back[dest_S, slot_S])
    return jnp.einsum('NKD,NK->ND', out_M.reshape(n, k, d), w_NK.astype(jnp.float32))

  tokens = (plan.batch, None)
  inner, outer = spec(plan.expert, None, plan.mlp), spec(plan.expert, plan.mlp, None)

  def run(x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD):
    # Grouped weights (quantized, adapted) bring a spec per array; float weights one spec.
    in_specs = (spec(*tokens), spec(*tokens), spec(*tokens), shard_map_specs_of(gate_EDF, inner),
                shard_map_specs_of(up_EDF, inner), shard_map_specs_of(down_EFD, outer))
    return jax.shard_map(per_shard, in_specs=in_specs, out_specs=spec(*tokens), check_vma=False)(
        x_ND, idx_NK, w_NK, gate_EDF, up_EDF, down_EFD)
  return run


@jax.custom_vjp
def _bias_feedback(y: jax.Array, bias_E: jax.Array, load_E: jax.Array) -> jax.Array:
  """Identity on y. Backward: y's cotangent passes through; bias_E gets load_E - mean(load_E) as its 'gradient'.

  Attached to the MoE output, not to the bias itself: the bias only feeds top_k's indices, so a cotangent reaching
  it is a symbolic zero and JAX never calls a backward placed there."""
  del bias_E, load_E
  return y


def _bias_feedback_fwd(y, bias_E, load_E):
  return y, (bias_E, load_E)


def _bias_feedback_bwd(res, g):
  bias_E, load_E = res
  return g, (load_E - load_E.mean()).astype(bias_E.dtype), jnp.zeros_like(load_E)


_bias_feedback.defvjp(_bias_feedback_fwd, _bias_feedback_bwd)


# ---------------------------------------------------------------- modules


class Router(nn.Module):
  """x [N, D] -> (float32 scores [N, E], correction bias float32 [E] or None). Params: kernel [D, E]
  ('embed', 'experts'), and e_score_correction_bias [E] (zeros, float32 whatever param_dtype) with `use_bias`."""
  num_experts: int
  scoring: str = 'softmax'
  use_bias: bool = False
  init_std: float = 0.02
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_ND: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    kernel = self.param('kernel', normal_init(self.init_std, ('embed', 'experts')),
                        (x_ND.shape[-1], self.num_experts), self.param_dtype)
    # float32 logits (as HF), at full precision: the selection is a discontinuous function of them.
    logits_NE = jnp.dot(x_ND.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    bias = None
    if self.use_bias:
      # float32 always: per-step increments of ~1e-3 would vanish in a bfloat16 bias.
      bias = self.param(BIAS_NAME, nn.with_logical_partitioning(nn.initializers.zeros, ('experts',)),
                        (self.num_experts,), jnp.float32)
    return expert_scores(logits_NE, self.scoring), bias


class Experts(nn.Module):
  """E SwiGLU experts over (token, expert) rows: see `routed_experts`. Params gate_proj / up_proj [E, D, F]
  ('experts', 'embed', 'mlp'), down_proj [E, F, D] ('experts', 'mlp', 'embed'); a stored param may be a grouped
  weight (see `grouped_matmul`: e.g. an int8 / int4 dsjax.quant.QTensor), which multiplies by itself."""
  num_experts: int
  hidden_size: int
  expert_dim: int
  init_std: float = 0.02
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def weight(self, name: str) -> Any:
    """The weight `name` (gate_proj | up_proj [E, D, F], down_proj [E, F, D]) as the grouped matmul takes it: a float
    array in the compute dtype, or the stored grouped weight as it is. The one place the experts' weights are read:
    adapters (dsjax/lora.py) intercept this method and return the weight wrapped with theirs."""
    e, d, f = self.num_experts, self.hidden_size, self.expert_dim
    if name == 'down_proj':
      shape, axes = (e, f, d), ('experts', 'mlp', 'embed')
    else:
      shape, axes = (e, d, f), ('experts', 'embed', 'mlp')
    if self.has_variable('params', name):
      stored = self.get_variable('params', name)
      if hasattr(stored, 'ragged_dot'):
        return stored
    return self.param(name, normal_init(self.init_std, axes), shape, self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x_ND: jax.Array, idx_NK: jax.Array, w_NK: jax.Array) -> jax.Array:
    e = self.num_experts
    args = (x_ND.astype(self.dtype), idx_NK, w_NK, self.weight('gate_proj'), self.weight('up_proj'),
            self.weight('down_proj'))
    plan = expert_parallel_plan(x_ND.shape[0], e)
    if plan is None:
      return routed_experts(*args)
    return expert_parallel(plan)(*args)


class MoE(nn.Module):
  """DeepSeekMoE layer, a drop-in for the dense MLP: `cfg` is the `model` config section (hidden_size, init_std,
  dtype, param_dtype and the `moe` fields).

  __call__(x [B, T, D], valid [B, T] bool or None (all valid)) -> (y [B, T, D] in cfg.dtype, aux) with
    aux['balance_loss']: float32 scalar, the UNWEIGHTED sequence-wise balance loss (`balance_loss`; the caller
      multiplies by moe.aux_loss_weight), exactly 0.0 (not computed) when moe.aux_loss_weight is 0;
    aux['expert_load']: float32 [E], valid tokens routed to each expert in this call.
  Padding tokens (valid False) are routed and computed like any other (static shapes) but count in neither.
  With topk_method='noaux_tc' the backward pass gives gate/e_score_correction_bias the 'gradient'
  expert_load - mean(expert_load) (see `_bias_feedback`; the optimizer turns it into the bias update).
  """
  cfg: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x_BTD: jax.Array, valid_BT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg, mo = self.cfg, self.cfg.moe
    dtype, param_dtype = to_dtype(cfg.dtype), to_dtype(cfg.param_dtype)
    b, t, d = x_BTD.shape
    e, k = mo.num_experts, mo.top_k
    valid_BT = jnp.ones((b, t), bool) if valid_BT is None else valid_BT.astype(bool)
    x_ND = x_BTD.reshape(b * t, d)

    scores_NE, bias_E = Router(e, mo.scoring, mo.topk_method == 'noaux_tc', cfg.init_std, param_dtype,
                               name='gate')(x_ND)
    idx_NK, w_NK = route(scores_NE, k, mo.topk_method, mo.num_groups, mo.topk_groups, bias_E, mo.norm_topk_prob,
                         mo.routed_scaling_factor)
    y_ND = Experts(e, d, mo.expert_dim, cfg.init_std, dtype, param_dtype, name='experts')(x_ND, idx_NK, w_NK)
    load_E = jax.lax.stop_gradient(expert_load(idx_NK, valid_BT.reshape(-1), e))
    if bias_E is not None:
      y_ND = _bias_feedback(y_ND, bias_E, load_E)
    if mo.num_shared_experts > 0:
      shared = MLP(d, mo.num_shared_experts * mo.expert_dim, cfg.init_std, dtype, param_dtype, name='shared_experts')
      y_ND = y_ND + shared(x_ND).astype(jnp.float32)

    if mo.aux_loss_weight > 0:
      loss = balance_loss(scores_NE.reshape(b, t, e), idx_NK.reshape(b, t, k), valid_BT)
    else:
      loss = jnp.zeros((), jnp.float32)
    return y_ND.reshape(b, t, d).astype(dtype), {'balance_loss': loss, 'expert_load': load_E}
