"""Attention visibility from per-document positions and segment ids (no dense mask is passed around)."""
import jax


def make_attention_mask(q_pos: jax.Array, k_pos: jax.Array, q_seg: jax.Array, k_seg: jax.Array, *,
                        window: int | None = None, num_global: int = 0) -> jax.Array:
  """bool [B, T, S]: key j is visible to query i.

  Visible iff same segment id, k_pos <= q_pos, and (window is None or q_pos - k_pos < window or
  k_pos < num_global). Positions restart at 0 in every document, so `k_pos < num_global` selects the first
  tokens of the document. Segment 0 is padding (sees only padding); -1 marks empty memory (matches nothing,
  as query segment ids are >= 0).

  Args:
    q_pos, q_seg: int [B, T]. k_pos, k_seg: int [B, S].
  """
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (kp <= qp)
  if window is not None:
    visible &= (qp - kp < window) | (kp < num_global)
  return visible
