"""Independent NumPy (float64) oracles with explicit loops and explicit mask conditions.

Written from the definitions in DESIGN.md and the HF LLaMA / Transformer-XL papers, not from dsjax code.
"""
import numpy as np


def visible(qp, kp, qs, ks, window, num_global) -> bool:
  if qs != ks or kp > qp:
    return False
  if window is None:
    return True
  return qp - kp < window or kp < num_global


def rope(x, pos, theta=10000.0, factor=1.0):
  """x [B, T, N, H], pos [B, T]: dim i pairs with dim i + H/2, rotated by (pos / factor) * theta^(-2i/H)."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  half = x.shape[-1] // 2
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for i in range(half):
        angle = (pos[b, t] / factor) * theta ** (-2.0 * i / x.shape[-1])
        c, s = np.cos(angle), np.sin(angle)
        a, bb = x[b, t, :, i], x[b, t, :, i + half]
        out[b, t, :, i] = a * c - bb * s
        out[b, t, :, i + half] = a * s + bb * c
  return out


def sinusoid(d, dim):
  """Transformer-XL embedding of one distance: [sin(d f_0..), cos(d f_0..)], f_i = 10000^(-2i/dim)."""
  f = np.array([10000.0 ** (-2.0 * i / dim) for i in range(dim // 2)])
  return np.concatenate([np.sin(d * f), np.cos(d * f)])


def attention(q, k, v, qpos, kpos, qseg, kseg, window=None, num_global=0, gates=None, r_of=None,
              u=None, vb=None):
  """Brute-force attention. r_of(d) -> [N, H] gives the XL position vector for distance d."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  bsz, t_len, n_heads, h = q.shape
  s_len, kv_heads = k.shape[1], k.shape[2]
  group = n_heads // kv_heads
  out = np.zeros_like(q)
  for b in range(bsz):
    for i in range(t_len):
      for n in range(n_heads):
        kv = n // group
        keys, scores = [], []
        for j in range(s_len):
          if not visible(qpos[b, i], kpos[b, j], qseg[b, i], kseg[b, j], window, num_global):
            continue
          if r_of is None:
            score = q[b, i, n] @ k[b, j, kv]
          else:
            r = r_of(qpos[b, i] - kpos[b, j])[n]
            score = (q[b, i, n] + u[n]) @ k[b, j, kv] + (q[b, i, n] + vb[n]) @ r
          keys.append(j)
          scores.append(score / np.sqrt(h))
        if not keys:
          continue
        p = np.exp(np.array(scores) - max(scores))
        p /= p.sum()
        for pj, j in zip(p, keys):
          out[b, i, n] += pj * v[b, j, kv]
        if gates is not None:
          out[b, i, n] *= gates[b, i, n]
  return out


def router(x, kernel, num_shared, top_k):
  """Gates [B, T, N] and probs [B, T, R]: shared heads 1, top_k routed heads top_k * p / sum(selected p)."""
  logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  bsz, t_len, n_routed = probs.shape
  gates = np.zeros((bsz, t_len, num_shared + n_routed))
  gates[..., :num_shared] = 1.0
  for b in range(bsz):
    for t in range(t_len):
      chosen = np.argsort(-probs[b, t], kind='stable')[:top_k]
      total = probs[b, t, chosen].sum()
      for c in chosen:
        gates[b, t, num_shared + c] = top_k * probs[b, t, c] / total
  return gates, probs


def rmsnorm(x, scale, eps):
  x = np.asarray(x, np.float64)
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def mlp(p, x):
  g = x @ p['gate_proj']['kernel']
  return (g / (1 + np.exp(-g)) * (x @ p['up_proj']['kernel'])) @ p['down_proj']['kernel']


def mask_args(cfg):
  a = cfg.attention
  if a.kind == 'sparse' or (a.kind == 'routed' and a.sparse_mask):
    return a.window, a.num_global
  return None, 0


def attention_module(p, cfg, x, pos, seg, memory=None):
  """The Attention module from its params p: projections, RoPE / XL, masked attention, gates, o_proj."""
  p = to_np(p)
  x = np.asarray(x, np.float64)
  kv_in, kpos, kseg = x, pos, seg
  if memory is not None:
    kv_in = np.concatenate([np.asarray(memory[0], np.float64), x], 1)
    kpos, kseg = np.concatenate([memory[1], pos], 1), np.concatenate([memory[2], seg], 1)
  q = np.einsum('btd,dnh->btnh', x, p['q_proj']['kernel'])
  k = np.einsum('btd,dnh->btnh', kv_in, p['k_proj']['kernel'])
  v = np.einsum('btd,dnh->btnh', kv_in, p['v_proj']['kernel'])
  extra = {}
  if cfg.positions.kind == 'rope':
    rp = (cfg.positions.rope_theta, cfg.positions.rope_scaling_factor)
    q, k = rope(q, pos, *rp), rope(k, kpos, *rp)
  else:
    w_r = p['r_proj']['kernel']
    extra = dict(r_of=lambda d: np.einsum('d,dnh->nh', sinusoid(d, w_r.shape[0]), w_r),
                 u=p['u_bias'], vb=p['v_bias'])
  gates = None
  if cfg.attention.kind == 'routed':
    gates, _ = router(x, p['router']['kernel'], cfg.attention.num_shared_heads, cfg.attention.top_k)
  window, num_global = mask_args(cfg)
  out = attention(q, k, v, pos, kpos, seg, kseg, window, num_global, gates, **extra)
  return np.einsum('btnh,nhd->btd', out, p['o_proj']['kernel'])


def transformer(params, cfg, tokens, pos, seg):
  """Whole decoder without memory: embed, pre-norm blocks, final norm, lm_head (or tied embedding)."""
  params = to_np(params)
  x = params['embedder']['embedding'][tokens]
  layers = params['layers']
  for layer in range(cfg.num_layers):
    p = _index(layers, layer)
    x = x + attention_module(p['attention'], cfg, rmsnorm(x, p['attn_norm']['scale'], cfg.norm_eps), pos, seg)
    x = x + mlp(p['mlp'], rmsnorm(x, p['mlp_norm']['scale'], cfg.norm_eps))
  x = rmsnorm(x, params['final_norm']['scale'], cfg.norm_eps)
  if cfg.tie_embeddings:
    return x @ params['embedder']['embedding'].T
  return x @ params['lm_head']['kernel']


def to_np(tree):
  if isinstance(tree, dict) or hasattr(tree, 'items'):
    return {k: to_np(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)


def _index(tree, i):
  if isinstance(tree, dict):
    return {k: _index(v, i) for k, v in tree.items()}
  return tree[i]
