"""Base config: every field dsjax reads, with defaults. Other configs start from this one.

Override any field from the command line, e.g.
  python train.py --config=configs/tiny.py --config.model.attention.kind=sparse --config.train.steps=50
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0

  # ---------------------------------------------------------------- model
  m = cfg.model = ml_collections.ConfigDict()
  m.vocab_size = 32256
  m.hidden_size = 2048
  m.num_layers = 24
  m.num_heads = 16
  m.num_kv_heads = 16          # < num_heads: grouped-query attention; 1: multi-query
  m.head_dim = 0               # 0: hidden_size // num_heads
  m.mlp_dim = 5504             # SwiGLU inner size
  m.norm_eps = 1e-6
  m.max_positions = 16384
  m.tie_embeddings = False
  m.dropout_rate = 0.0
  m.dtype = 'bfloat16'         # compute dtype of activations and matmuls
  m.param_dtype = 'float32'    # storage dtype of the (master) parameters
  m.remat = 'none'             # none | full | dots (save matmul outputs, recompute the rest)
  m.init_std = 0.02
  m.qkv_bias = False           # biases on q/k/v projections (Qwen2, DeepSeek-R1-Distill-Qwen)

  p = m.positions = ml_collections.ConfigDict()
  p.kind = 'rope'              # rope | xl
  p.rope_theta = 10000.0
  p.rope_scaling_factor = 1.0  # linear scaling (DeepSeek-Coder uses 4.0): positions / factor
  p.mem_len = 0                # xl: number of previous hidden states kept per layer as memory
  p.rope_scaling = 'linear'    # linear (positions / rope_scaling_factor) | yarn (DeepSeek-V2/V3; fields below)
  p.yarn_original_max_positions = 4096  # yarn: the context the model was pretrained with
  p.yarn_beta_fast = 32.0      # yarn: frequency ramp bounds, in rotations over the original context
  p.yarn_beta_slow = 1.0
  p.yarn_mscale = 0.0          # yarn: attention temperature terms (HF rope_scaling mscale, mscale_all_dim; 0: unset)
  p.yarn_mscale_all_dim = 0.0

  a = m.attention = ml_collections.ConfigDict()
  a.kind = 'full'              # full | sparse | routed
  a.impl = 'auto'              # auto (per call, the fastest exact path: reference on CPU, Pallas kernels on TPU,
                               # cuDNN or Pallas on GPU; dsjax/model/dispatch.py) | reference | pallas | cudnn
  a.platform = ''              # '' (where the process runs) | cpu | gpu | tpu: the platform attention is built for;
                               # set it to lower for another one (e.g. tpu from a CPU machine)
  a.window = 128               # sparse (and routed with sparse_mask): keys within the last `window` positions
  a.num_global = 4             # sparse: first tokens of each document every query may attend to (sinks)
  a.top_k = 4                  # routed: active routed heads per token
  a.num_shared_heads = 0       # routed: heads always active (the first ones), not routed
  a.sparse_mask = False        # routed: also apply the sparse window + global mask
  a.router_aux_weight = 0.01   # routed: weight of the load-balance loss in the training loss

  # Multi-head latent attention (DeepSeek-V2 section 2.1; dsjax/model/mla.py): on when kv_lora_rank > 0. Keys and
  # values come from a compressed latent of kv_lora_rank numbers per token plus one shared RoPE key of
  # qk_rope_head_dim; the decode cache holds those. The attention kinds' masks (full, sparse) apply to it.
  la = m.mla = ml_collections.ConfigDict()
  la.kv_lora_rank = 0          # 0: standard attention (q/k/v projections)
  la.q_lora_rank = 0           # 0: queries projected directly from the hidden state (DeepSeek-V2-Lite)
  la.qk_nope_head_dim = 128    # per-head query/key size without position encoding
  la.qk_rope_head_dim = 64     # per-head query size with RoPE, and the one shared RoPE key
  la.v_head_dim = 128

  # DeepSeekMoE (dsjax/model/moe.py): shared experts plus fine-grained routed experts, dropless (tokens sorted by
  # expert, grouped matmul). On when num_experts > 0, for the layers after the first `first_dense_layers`.
  mo = m.moe = ml_collections.ConfigDict()
  mo.num_experts = 0           # routed experts (0: every layer has the dense mlp_dim MLP)
  mo.num_shared_experts = 0    # always-active experts (one SwiGLU of num_shared_experts * expert_dim)
  mo.expert_dim = 1408         # SwiGLU inner size of each expert (HF moe_intermediate_size)
  mo.top_k = 6                 # routed experts per token
  mo.scoring = 'softmax'       # softmax (V2) | sigmoid (V3)
  mo.topk_method = 'greedy'    # greedy | group_limited_greedy (V2: groups by max score) | noaux_tc (V3: groups by
                               # top-2 sum of bias-corrected scores; the bias only selects, it never weights)
  mo.num_groups = 1            # expert groups (HF n_group) for the group-limited methods
  mo.topk_groups = 1           # groups a token may use (HF topk_group)
  mo.norm_topk_prob = False    # renormalise the top-k weights to sum to 1
  mo.routed_scaling_factor = 1.0
  mo.first_dense_layers = 0    # HF first_k_dense_replace: the first layers keep the dense MLP
  mo.layer_freq = 1            # HF moe_layer_freq: every layer after those is MoE (the published models use 1)
  mo.aux_loss_weight = 0.0     # sequence-wise balance loss weight (DeepSeek-V3 eq. 17-20; V2's alpha_1)
  mo.bias_update_rate = 0.0    # auxiliary-loss-free balance (DeepSeek-V3): per step, the correction bias of an
                               # over-loaded expert falls and an under-loaded one rises by this rate (noaux_tc)

  # Multi-token prediction (DeepSeek-V3 section 2.2): modules after the stack that predict token t+1+k from the
  # hidden state and the embedding of token t+k, sharing the embedding and the output head.
  mt = m.mtp = ml_collections.ConfigDict()
  mt.num_layers = 0            # HF num_nextn_predict_layers
  mt.loss_weight = 0.3         # lambda: weight of the mean MTP loss in the training loss

  # ---------------------------------------------------------------- data
  d = cfg.data = ml_collections.ConfigDict()
  d.source = 'stdlib'          # stdlib | path to a directory of text files, a .txt or a .jsonl file
  d.include_stdlib_tests = False
  d.jsonl_field = 'text'
  d.validation_fraction = 0.05  # of documents, chosen by a stable hash of the document name
  d.tokenizer = 'byte'         # byte | path to a Hugging Face tokenizer.json
  d.bos_token = ''             # HF tokenizers: names of the special tokens ('' = the usual names)
  d.eos_token = ''
  d.pad_token = ''
  d.seq_len = 2048
  d.shuffle_seed = 0
  d.num_threads = 1            # grain read threads
  d.num_shards = 0             # data shards (0: one per process); each process reads num_shards / processes of
                               # them, so the global batches do not depend on the number of processes
  d.eval_batches = 16
  # Mixtures (dsjax/data/mixture.py): {name: {source, weight[, jsonl_field, include_stdlib_tests]}}; config files add
  # entries (see configs/continual_deepseek_coder.py), the command line can change them. Empty: data.source alone.
  d.mixture = ml_collections.ConfigDict()
  d.mixture_unit = 'tokens'    # weights are shares of tokens | documents
  d.balance_by = ''            # class-balanced sampling within each source by: '' (off) | extension | directory |
                               # a JSONL field (e.g. 'lang')
  d.balance_alpha = 0.0        # class share ~ size ** alpha: 0 balanced, 1 natural proportions
  d.dedup = 'near'             # none | exact | near (MinHash, includes exact): across all sources, before the split
  d.dedup_threshold = 0.8      # near duplicates: estimated Jaccard similarity of word 5-gram shingles
  d.scrub = ''                 # secrets/PII scrubbing (dsjax/data/scrub.py): '' (off) | all | comma-separated
                               # categories
  d.scrub_mode = 'mask'        # mask (placeholders such as <EMAIL>) | drop_document
  d.cache_dir = ''             # dedup/scrub pass results; '' = $XDG_CACHE_HOME/dsjax (~/.cache/dsjax)
  d.fim_rate = 0.0             # share of training documents in fill-in-the-middle form (DeepSeek-Coder: 0.5)
  d.fim_spm_rate = 0.5         # of those, the share in SPM order (else PSM)
  d.curriculum = ()            # ((start_step, seq_len, fim_rate), ...): short-to-long rows and a FIM schedule; the
                               # first stage starts at 0, seq_len <= data.seq_len; (): data.seq_len and fim_rate

  # ---------------------------------------------------------------- training
  t = cfg.train = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 32            # global batch, in sequences
  t.grad_accum_steps = 1       # microbatches per step (each batch_size / grad_accum_steps rows); same update
  t.log_every = 10
  t.eval_every = 200
  t.progress_bar = True
  t.z_loss_weight = 0.0
  t.workdir = ''               # metrics.jsonl, TensorBoard events, checkpoints/ and the final checkpoint; '':
                               # train.py uses runs/<config name>, library calls save nothing
  t.checkpoint_every = 500     # steps between (async) checkpoints in <workdir>/checkpoints; 0: only at the end
  t.keep_checkpoints = 3       # the latest N step checkpoints are kept ...
  t.keep_best = 1              # ... plus the N with the lowest held-out loss (0: none)
  t.resume = True              # continue from the latest checkpoint in <workdir>/checkpoints when there is one
  t.tensorboard = True         # TensorBoard event files in <workdir>/tensorboard (process 0)
  t.max_nonfinite_steps = 20   # consecutive non-finite losses (updates skipped) before the run stops
  t.peak_flops_per_device = 0.0  # for MFU; 0: from the device table in dsjax/train/flops.py
  t.init_from = ''             # a dsjax checkpoint directory (e.g. from dsjax.convert.hf) to start from
  t.trainable = 'auto'         # params that train: 'all', 'adapters' (LoRA), or subtree paths 'layers/mlp,lm_head';
                               # 'auto': adapters with lora.enabled, else all (dsjax/train/partition.py)
  t.num_samples = 3            # completions printed at the end of training
  t.sample_prompts = ('def ', 'import ', 'class ')

  # ---------------------------------------------------------------- optimizer
  o = cfg.optim = ml_collections.ConfigDict()
  o.learning_rate = 3e-4
  o.warmup_steps = 100
  o.min_lr_ratio = 0.1         # cosine decays to learning_rate * min_lr_ratio
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.01        # not applied to norms and biases
  o.clip_norm = 1.0

  # ---------------------------------------------------------------- device mesh
  me = cfg.mesh = ml_collections.ConfigDict()
  me.data = -1                 # -1: all devices not used by the other axes
  me.fsdp = 1
  me.expert = 1                # expert parallelism: routed experts split over it, tokens exchanged all-to-all
  me.tensor = 1
  # Logical parameter/activation axis -> mesh axes (None: replicated). Model code names axes, never devices.
  me.rules = (
      ('batch', ('data', 'fsdp', 'expert')),  # the expert axis splits tokens outside the MoE layers
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('head_dim', None),
      ('layers', None),
      ('experts', 'expert'),
      ('q_lora', 'fsdp'),        # latent ranks: q_b_proj / kv_b_proj split over fsdp (q_a / kv_a_proj keep embed
      ('kv_lora', 'fsdp'),       # there: a mesh axis serves one dimension of a parameter, the first rule that fits)
  )

  # ---------------------------------------------------------------- sampling
  s = cfg.sample = ml_collections.ConfigDict()
  s.max_new_tokens = 128
  s.temperature = 0.8          # 0: greedy
  s.top_k = 0                  # 0: off
  s.top_p = 1.0                # nucleus sampling mass; 1: off
  s.seed = 0

  # ---------------------------------------------------------------- LoRA (dsjax/lora.py)
  lo = cfg.lora = ml_collections.ConfigDict()
  lo.enabled = False           # train only low-rank adapters; the base weights stay frozen
  lo.rank = 16
  lo.alpha = 32.0              # adapter output scaled by alpha / rank
  lo.dropout = 0.1             # on the adapter's input
  lo.targets = ('q_proj', 'v_proj')  # lora.ALL_TARGETS, e.g. kv_b_proj, gate_proj (MLP/shared experts), experts.up_proj
  lo.base_int8 = False         # keep the frozen base weights in int8 (QLoRA-style memory saving)
  lo.adapter = ''              # a PEFT adapter directory to start from (serve.py --adapter=DIR serves one)

  # ---------------------------------------------------------------- distillation (dsjax/distill.py)
  di = cfg.distill = ml_collections.ConfigDict()
  di.teacher = ''              # a dsjax checkpoint directory; '' = no distillation
  di.temperature = 2.0         # softens teacher and student distributions in the KL term
  di.kl_weight = 0.5           # loss = kl_weight * T^2 * KL(teacher || student) + hard_weight * cross-entropy
  di.hard_weight = 0.5
  di.top_k = 0                 # > 0: only the teacher's top-k logits per token enter the KL (large vocabularies)

  # ---------------------------------------------------------------- quantization (dsjax/quant.py)
  q = cfg.quant = ml_collections.ConfigDict()
  q.mode = 'none'              # none | int8 (per-channel) | int4 (group-wise): weight-only, for serving
  q.group_size = 128           # int4: weights per scale along the input dimension (even; a kernel whose input
                               # size it does not divide uses the largest even divisor below it)
  q.activations = False        # also quantize activations to int8 (dynamic, per token)

  # ---------------------------------------------------------------- differential privacy (dsjax/privacy.py)
  dp = cfg.privacy = ml_collections.ConfigDict()
  dp.enabled = False           # DP-SGD: per-example gradient clipping + Gaussian noise
  dp.l2_clip = 1.0             # per-example gradient norm bound C
  dp.noise_multiplier = 1.0    # noise std = noise_multiplier * C (on the summed gradient)
  dp.delta = 1e-5              # epsilon is reported for this delta

  # ---------------------------------------------------------------- evaluation at the end of training (dsjax/eval/)
  ev = cfg.eval = ml_collections.ConfigDict()
  ev.tasks = ()                # any of 'perplexity', 'completion', 'mc'; results land in the summary and metrics.jsonl
  ev.mc_file = ''              # mc: an MMLU-format JSONL file (question, choices, answer)
  ev.completion_examples = 200  # completion: held-out functions scored
  ev.completion_lines = 1      # completion: body lines that must match exactly

  return cfg
