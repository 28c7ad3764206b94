"""Hugging Face checkpoints (LLaMA / DeepSeek-Coder, Qwen2 / R1-Distill, DeepSeek-V2 / V3) <-> dsjax checkpoints.

  python -m dsjax.convert.hf import <hf_dir> <dsjax_dir> [--param_dtype=float32] [--config=configs/base.py]
  python -m dsjax.convert.hf export <dsjax_dir> <hf_dir> [--dtype=bfloat16] [--max_shard_size=5GB]

Import reads `config.json`, the safetensors weights (one file or shards listed in `model.safetensors.index.json`)
and the tokenizer files, and writes a dsjax checkpoint (dsjax.checkpoint) that `train.py` and the sampler
load directly. Tensors are read one at a time (memory-mapped by safetensors) into one stacked [layers, ...] buffer
per parameter, which is then placed on the mesh shard by shard and dropped, so host memory never holds a second
copy of the model. Block-quantized fp8 weights (DeepSeek-V3/R1 as published: `<name>_scale_inv` block scales,
config.json quantization_config) are dequantized on the way. Export streams the other way, one output shard at a
time, and writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads; a checkpoint with
dsjax's byte-level tokenizer gets a tokenizer.json with the same ids (`byte_tokenizer`) for
`transformers.AutoTokenizer`.

The architectures and their tensor mappings are in dsjax/convert/architectures.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from typing import Any, Callable, Iterator, Sequence

from flax import linen as nn
import jax
import ml_collections
import ml_dtypes
import numpy as np
from safetensors import safe_open
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from dsjax import config as config_lib
from dsjax import files as files_lib
from dsjax import sharding as sharding_lib
from dsjax.data import tokenizer as tokenizer_lib
from dsjax import checkpoint
from dsjax.convert.architectures import (ARCHITECTURES, ConversionError, architecture, hf_config_from_model,
                                         hf_tensor_names, model_config_from_hf, mtp_shared_copies, tensor_maps)

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES.values())
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
ORIGINAL_CONFIG = 'hf_config.json'  # the imported config.json, kept in the dsjax checkpoint
# Tensors some exporters add that carry no learned state.
_IGNORED_TENSORS = re.compile(r'.*\.rotary_emb\.inv_freq$')
_DTYPES = {'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
           'bfloat16': np.dtype(ml_dtypes.bfloat16)}
# Router tensors transformers keeps in float32 whatever the model's dtype (DeepseekV2/V3 _keep_in_fp32_modules_strict);
# DeepSeek-V3's published bfloat16/fp8 checkpoint stores e_score_correction_bias in float32 too.
_FLOAT32_TENSORS = re.compile(r'.*\.mlp\.gate\.(weight|e_score_correction_bias)$')
# fp8 dtypes safetensors' numpy reader cannot return (it asks numpy, not ml_dtypes, for them): read from the raw bytes.
_FP8_DTYPES = {'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn), 'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2)}
SCALE_SUFFIX = '_scale_inv'  # <weight>_scale_inv: the float32 block scales of an fp8 <weight>
DEFAULT_FP8_BLOCK = (128, 128)  # DeepSeek-V3's, and transformers' FineGrainedFP8Config default


# ------------------------------------------------------------------------------------------------ reading

class SafetensorsReader:
  """Tensor name -> file over one `model.safetensors` or the shards of `model.safetensors.index.json`.

  `read` copies one tensor into host memory; nothing else of the files stays resident. Block-quantized fp8 weights
  (DeepSeek-V3/R1 as published: a float8_e4m3fn `<name>` and a float32 `<name>_scale_inv` with one scale per block of
  `weight_block_size` [rows, columns]) read as their float32 dequantization, and `names` leaves their scales out.
  `weight_block_size` None: config.json's quantization_config.weight_block_size, else 128 x 128.
  """

  def __init__(self, directory: str, weight_block_size: tuple[int, int] | None = None):
    self.directory = directory
    self.weight_block_size = tuple(weight_block_size) if weight_block_size else _fp8_block_size(directory)
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
      with open(index_path) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise ConversionError(f'{index_path}: no "weight_map" object')
      self.files = dict(weight_map)
    else:
      files = sorted(f for f in os.listdir(directory) if f.endswith('.safetensors'))
      if not files:
        raise ConversionError(f'{directory}: no *.safetensors weights (and no {INDEX_FILE})')
      if len(files) > 1:
        raise ConversionError(f'{directory}: {len(files)} safetensors files but no {INDEX_FILE} saying which tensor '
                              'is in which')
      with safe_open(os.path.join(directory, files[0]), framework='numpy') as f:
        self.files = {name: files[0] for name in f.keys()}
    missing = sorted({f for f in self.files.values() if not os.path.isfile(os.path.join(directory, f))})
    if missing:
      raise ConversionError(f'{directory}: missing weight shard(s) {missing} listed in {INDEX_FILE}')

  def names(self) -> set[str]:
    """The tensor names, less the `_scale_inv` of each weight in the files (`read` folds them into the weight)."""
    return {n for n in self.files if not (n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in self.files)}

  def dequantized(self, name: str) -> bool:
    """Whether `read(name)` dequantizes an fp8 weight with its `_scale_inv`."""
    return name + SCALE_SUFFIX in self.files

  def read(self, name: str) -> np.ndarray:
    """The tensor as stored, or (`dequantized`) the float32 product of an fp8 weight and its block scales."""
    tensor = self._read_stored(name)
    scale_name = name + SCALE_SUFFIX
    if tensor.dtype in _FP8_DTYPES.values():
      if scale_name not in self.files:
        raise ConversionError(f'tensor {name}: stored as {tensor.dtype} without the {scale_name} that dequantizes it')
      return dequantize_fp8_blocks(tensor, self._read_stored(scale_name), self.weight_block_size, name)
    if scale_name in self.files:
      raise ConversionError(f'tensor {name}: has block scales {scale_name} but is stored as {tensor.dtype}, not fp8')
    return tensor

  def _read_stored(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ConversionError(f'{self.directory}: tensor {name!r} is missing')
    path = os.path.join(self.directory, self.files[name])
    # A fresh handle per tensor: an open handle keeps every page it has read resident, which would grow to the
    # whole file (measured: RSS += the bytes read until the handle closes); reopening only re-reads the header.
    with safe_open(path, framework='numpy') as f:
      stored = f.get_slice(name).get_dtype()
      if stored not in _FP8_DTYPES:
        return f.get_tensor(name)
    return _read_raw(path, name, _FP8_DTYPES[stored])


def _read_raw(path: str, name: str, dtype: np.dtype) -> np.ndarray:
  """One tensor of a safetensors file, from its bytes: an 8-byte little-endian header size, the JSON header
  ({name: {dtype, shape, data_offsets: [begin, end)}}, offsets counted from the end of the header), the data."""
  with open(path, 'rb') as f:
    (header_size,) = struct.unpack('<Q', f.read(8))
    entry = json.loads(f.read(header_size))[name]
    begin, end = entry['data_offsets']
    shape = tuple(entry['shape'])
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise ConversionError(f'{path}: tensor {name} has {end - begin} bytes, not the {np.prod(shape)} x '
                            f'{dtype.itemsize} its shape {list(shape)} needs')
    f.seek(8 + header_size + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, dtype).reshape(shape)  # one-byte types: no byte order


def _fp8_block_size(directory: str) -> tuple[int, int]:
  """[rows, columns] of the fp8 weight blocks config.json's quantization_config gives (128 x 128 without one);
  a quantization dsjax cannot read raises."""
  config_path = os.path.join(directory, 'config.json')
  quantization = None
  if os.path.isfile(config_path):
    with open(config_path) as f:
      quantization = json.load(f).get('quantization_config')
  if not quantization:
    return DEFAULT_FP8_BLOCK
  method = quantization.get('quant_method')
  if method != 'fp8':
    raise ConversionError(f'config.json: quantization_config quant_method={method!r} is not supported (dsjax reads '
                          "float checkpoints and DeepSeek-V3's block-wise fp8, quant_method 'fp8')")
  block = quantization.get('weight_block_size', list(DEFAULT_FP8_BLOCK))
  if (not isinstance(block, (list, tuple)) or len(block) != 2
      or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
    raise ConversionError(f'config.json: quantization_config weight_block_size={block!r}: expected [rows, columns] '
                          '(per-tensor fp8 scales are not supported)')
  return int(block[0]), int(block[1])


def dequantize_fp8_blocks(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int],
                          name: str = 'weight') -> np.ndarray:
  """float32 [rows, cols]: each block[0] x block[1] block of the fp8 `weight` times its entry of `scale_inv`
  [ceil(rows / block[0]), ceil(cols / block[1])]; the blocks at the right and bottom edges may be smaller. This is
  DeepSeek-V3's inference/kernel.py weight_dequant (what inference/fp8_cast_bf16.py applies), before its bf16 cast."""
  if weight.ndim != 2:
    raise ConversionError(f'tensor {name}: an fp8 weight of shape {weight.shape}; block scales need a matrix')
  (rows, cols), (block_rows, block_cols) = weight.shape, block
  grid = (-(-rows // block_rows), -(-cols // block_cols))
  if scale_inv.shape != grid:
    raise ConversionError(f'tensor {name}{SCALE_SUFFIX}: shape {scale_inv.shape}, but a {rows} x {cols} weight in '
                          f'{block_rows} x {block_cols} blocks (config.json quantization_config.weight_block_size) '
                          f'has {grid} of them')
  out = np.empty((rows, cols), np.float32)
  for i in range(grid[0]):  # one band of blocks at a time: no full-size copy of the scales
    band = slice(i * block_rows, (i + 1) * block_rows)
    col_scales = np.repeat(scale_inv[i].astype(np.float32), block_cols)[:cols]
    out[band] = weight[band].astype(np.float32) * col_scales
  return out


def _declared_dtype(hf: dict[str, Any]) -> np.dtype | None:
  name = hf.get('torch_dtype') or hf.get('dtype')
  return _DTYPES.get(str(name).replace('torch.', '')) if name else None


def read_hf_params(reader: SafetensorsReader, m: ml_collections.ConfigDict, *, param_dtype: np.dtype,
                   declared_dtype: np.dtype | None, place: Callable[[tuple[str, ...], np.ndarray], Any]) -> dict:
  """Builds the dsjax params tree, one parameter at a time: read (and check) its tensors, stack per layer, cast to
  `param_dtype`, then hand the host buffer to `place` (which puts it on devices) before reading the next one."""
  expected = set(hf_tensor_names(m))
  unexpected = sorted(n for n in reader.names() - expected if not _IGNORED_TENSORS.match(n))
  if unexpected:
    raise ConversionError(f'{reader.directory}: tensors not in a {ARCHITECTURES[architecture(m)]} with this '
                          f'config.json: {unexpected[:8]}{" ..." if len(unexpected) > 8 else ""}')
  missing = sorted(expected - reader.names())
  if missing:
    raise ConversionError(f'{reader.directory}: missing tensors {missing[:8]}{" ..." if len(missing) > 8 else ""}')
  shapes = _dsjax_shapes(m)
  params: dict[str, Any] = {}
  for t in tensor_maps(m):
    buffer = np.empty(shapes[t.path], param_dtype)
    shape = buffer.shape[len(t.lead):]
    rows = buffer.reshape(-1, *shape)  # a view: one row per HF tensor, in the order of t.names()
    for row, name in enumerate(t.names()):
      tensor = reader.read(name)  # fp8 weights come dequantized, in float32: no dtype of the file to check
      if not reader.dequantized(name):
        _check_dtype(name, tensor.dtype, declared_dtype)
      value = t.to_dsjax(tensor)
      if value.shape != shape:
        raise ConversionError(f'tensor {name}: shape {tensor.shape} does not fit config.json (expected '
                              f'{t.to_hf(np.empty(shape)).shape})')
      rows[row] = value
      del tensor, value
    node = params
    for key in t.path[:-1]:
      node = node.setdefault(key, {})
    node[t.path[-1]] = place(t.path, buffer)
    del buffer, rows
  for copy, main in mtp_shared_copies(m).items():  # the MTP layers' copies of the embedding and head
    if not np.array_equal(reader.read(copy), reader.read(main)):
      raise ConversionError(f'tensor {copy}: differs from {main}, which dsjax shares with the multi-token-prediction '
                            'layer (DeepSeek-V3 stores the same tensor twice)')
  return params


def _check_dtype(name: str, dtype: np.dtype, declared_dtype: np.dtype | None) -> None:
  """A stored tensor's dtype must be a float type and config.json's, or float32 for a router tensor."""
  if not np.issubdtype(dtype, np.floating) and dtype != _DTYPES['bfloat16']:
    raise ConversionError(f'tensor {name}: dtype {dtype} is not a float type (of quantized checkpoints dsjax reads '
                          f'only block-wise fp8 weights with {SCALE_SUFFIX} scales)')
  if declared_dtype is not None and dtype != declared_dtype and not (
      dtype == np.float32 and _FLOAT32_TENSORS.match(name)):
    raise ConversionError(f'tensor {name}: dtype mismatch, stored as {dtype} but config.json declares '
                          f'{declared_dtype}')


def _dsjax_shapes(m: ml_collections.ConfigDict) -> dict[tuple[str, ...], tuple[int, ...]]:
  """The shape of every parameter (stacked layers and experts included), from the model's abstract init."""
  flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(checkpoint.abstract_params(m)))
  return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


# ------------------------------------------------------------------------------------------------ import

def default_base_config() -> str:
  """configs/base.py of the repository this package lives in."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs',
                      'base.py')


def import_hf(hf_dir: str, out_dir: str, *, base_config: str | None = None, param_dtype: str = 'float32',
              mesh_cfg: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """Converts a HF LLaMA / DeepSeek-Coder directory into a dsjax checkpoint at `out_dir`; returns its config.

  Parameters are placed on the mesh of `mesh_cfg` (default: the base config's mesh) with the shardings their
  logical axes ask for, so no device ever holds a full copy of a sharded parameter.
  """
  config_path = os.path.join(hf_dir, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'{hf_dir}: no config.json (is this a Hugging Face model directory?)')
  with open(config_path) as f:
    hf = json.load(f)
  if param_dtype not in _DTYPES:
    raise ConversionError(f'param_dtype={param_dtype!r}: expected one of {sorted(_DTYPES)}')
  cfg = config_lib.load_config(base_config or default_base_config())
  reader = SafetensorsReader(hf_dir)
  with cfg.unlocked():
    cfg.model = model_config_from_hf(hf, cfg.model)
    if cfg.model.mla.kv_lora_rank:  # LoRA's usual q/v pair, in latent attention
      cfg.lora.targets = ('q_b_proj' if cfg.model.mla.q_lora_rank else 'q_proj', 'kv_b_proj')
    mtp_weights = f'model.layers.{cfg.model.num_layers}.eh_proj.weight'
    if cfg.model.mtp.num_layers and mtp_weights not in reader.names():
      print(f'note: config.json declares {cfg.model.mtp.num_layers} multi-token-prediction layer(s), but {hf_dir} '
            f'holds no {mtp_weights} (transformers does not save them): imported without MTP', file=sys.stderr)
      cfg.model.mtp.num_layers = 0
    cfg.model.param_dtype = param_dtype
    if mesh_cfg is not None:
      cfg.mesh = mesh_cfg
    cfg.data.seq_len = min(cfg.data.seq_len, cfg.model.max_positions)
  tokenizer_files = [os.path.join(hf_dir, f) for f in checkpoint.TOKENIZER_FILES
                     if os.path.isfile(os.path.join(hf_dir, f))]
  if os.path.isfile(os.path.join(hf_dir, 'tokenizer.json')):
    cfg.data.tokenizer = os.path.join(hf_dir, 'tokenizer.json')
    _set_special_tokens(cfg, hf, os.path.join(hf_dir, 'tokenizer.json'))
  else:
    print(_byte_tokenizer_note(hf_dir), file=sys.stderr)

  mesh = sharding_lib.make_mesh(cfg.mesh)
  shardings = sharding_lib.param_shardings(checkpoint.abstract_params(cfg.model), mesh, cfg.mesh)

  def place(path: tuple[str, ...], host: np.ndarray) -> jax.Array:
    sharding = shardings
    for key in path:
      sharding = sharding[key]
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  params = read_hf_params(reader, cfg.model, param_dtype=_DTYPES[param_dtype],
                          declared_dtype=_declared_dtype(hf), place=place)
  checkpoint.save_model(out_dir, cfg, params, tokenizer_files)
  shutil.copyfile(config_path, os.path.join(out_dir, ORIGINAL_CONFIG))
  return checkpoint.load_config(out_dir)


def _byte_tokenizer_note(hf_dir: str) -> str:
  """What importing a directory without tokenizer.json means (one line, printed by import_hf)."""
  sentencepiece = os.path.isfile(os.path.join(hf_dir, 'tokenizer.model'))
  hint = (' (its tokenizer.model is a SentencePiece file, which dsjax does not read: write a tokenizer.json with '
          'transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir))' if sentencepiece else '')
  return (f'note: {hf_dir} has no tokenizer.json, so the checkpoint uses dsjax\'s byte-level tokenizer (data.tokenizer='
          "'byte'): text is encoded as its UTF-8 bytes, ids 0-255, with pad/bos/eos/fill-in-the-middle ids 256-261. "
          'That fits a model trained on bytes; a model with its own vocabulary needs its tokenizer.json in the '
          f'directory (import again){hint}.')


def _set_special_tokens(cfg: ml_collections.ConfigDict, hf: dict[str, Any], tokenizer_path: str) -> None:
  """Names the tokenizer's bos/eos/pad tokens after the ids config.json gives (pad falls back to eos)."""
  tok = tokenizers.Tokenizer.from_file(tokenizer_path)
  for role in ('bos', 'eos', 'pad'):
    token_id = hf.get(f'{role}_token_id')
    if isinstance(token_id, list):
      token_id = token_id[0] if token_id else None
    if token_id is None:
      continue
    name = tok.id_to_token(int(token_id))
    if name is None:
      raise ConversionError(f'config.json: {role}_token_id={token_id} is not in {tokenizer_path}')
    cfg.data[f'{role}_token'] = name


# ------------------------------------------------------------------------------------------------ export

def _parse_size(text: str) -> int:
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?B?)\s*', text.upper())
  if not match:
    raise ConversionError(f'max_shard_size={text!r}: expected a size such as 5GB, 200MB or 1000000')
  scale = {'': 1, 'B': 1, 'K': 1e3, 'KB': 1e3, 'M': 1e6, 'MB': 1e6, 'G': 1e9, 'GB': 1e9}[match.group(2)]
  return int(float(match.group(1)) * scale)


def _hf_tensors(params: dict, m: ml_collections.ConfigDict, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, host tensor in `dtype`) one at a time; per-layer slices are fetched from devices one by one."""
  for t in tensor_maps(m):
    value = params
    for key in t.path:
      value = value[key]
    names = iter(t.names())
    for layer in (range(len(t.layers)) if t.per_layer else [None]):  # one layer at a time on the host
      host = np.asarray(value if layer is None else value[layer]).astype(dtype)
      for row in (host if t.experts else [host]):
        yield next(names), np.ascontiguousarray(t.to_hf(row))
  by_name = {t.hf_name: t for t in tensor_maps(m)}
  for copy, main in mtp_shared_copies(m).items():
    t = by_name[main]
    value = params
    for key in t.path:
      value = value[key]
    yield copy, np.ascontiguousarray(t.to_hf(np.asarray(value).astype(dtype)))


def export_hf(ckpt_dir: str, hf_dir: str, *, dtype: str | None = None, max_shard_size: str = '5GB') -> None:
  """Writes a dsjax checkpoint as a HF directory (config.json, safetensors, tokenizer files) of the architecture
  `architectures.architecture` names: Llama, Qwen2, DeepseekV2 or DeepseekV3."""
  cfg = checkpoint.load_config(ckpt_dir)
  dtype = dtype or cfg.model.param_dtype
  if dtype not in _DTYPES:
    raise ConversionError(f'dtype={dtype!r}: expected one of {sorted(_DTYPES)}')
  np_dtype = _DTYPES[dtype]
  token_ids = _special_token_ids(cfg, ckpt_dir)
  hf_config = hf_config_from_model(cfg.model, dtype=dtype, **token_ids)
  params = checkpoint.load_params(ckpt_dir, cfg.model)

  # Plan the shards from shapes alone, then stream tensors into them.
  limit = _parse_size(max_shard_size)
  names = hf_tensor_names(cfg.model)
  sizes = _hf_tensor_bytes(cfg.model, np_dtype.itemsize)
  shards: list[list[str]] = [[]]
  used = 0
  for name in names:
    if shards[-1] and used + sizes[name] > limit:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += sizes[name]
  files = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))])
  os.makedirs(hf_dir, exist_ok=True)
  tensors = _hf_tensors(params, cfg.model, np_dtype)
  weight_map = {}
  for file, shard in zip(files, shards):
    batch = {}
    for expected_name in shard:
      name, value = next(tensors)
      assert name == expected_name, (name, expected_name)
      batch[name] = value
      weight_map[name] = file
    files_lib.save_safetensors(batch, os.path.join(hf_dir, file), metadata={'format': 'pt'})
    del batch
  if len(files) > 1:
    with open(os.path.join(hf_dir, INDEX_FILE), 'w') as f:
      json.dump({'metadata': {'total_size': int(sum(sizes.values()))}, 'weight_map': weight_map}, f, indent=2)
  with open(os.path.join(hf_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2)
  if cfg.data.tokenizer != 'byte':
    for name in checkpoint.TOKENIZER_FILES:
      source = os.path.join(os.path.abspath(ckpt_dir), name)
      if os.path.isfile(source):
        shutil.copyfile(source, os.path.join(hf_dir, name))
  elif reason := _byte_tokenizer_mismatch(cfg.model, ckpt_dir):
    print(f'note: no tokenizer files written to {hf_dir}: {reason}', file=sys.stderr)
  else:
    write_byte_tokenizer(hf_dir, cfg.model.max_positions)


# Names of dsjax's byte-level special tokens in the exported tokenizer (those dsjax looks for first on import).
BYTE_SPECIAL_TOKENS = {'pad': '<pad>', 'bos': '<s>', 'eos': '</s>'}


def _byte_alphabet() -> list[str]:
  """The character the ByteLevel pre-tokenizer emits for each byte (GPT-2's printable stand-ins), index = byte."""
  printable = {*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)}
  unprintable = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(unprintable)) for b in range(256)]


def byte_tokenizer() -> tokenizers.Tokenizer:
  """dsjax's ByteTokenizer as a `tokenizers` Tokenizer with the same ids: the ByteLevel pre-tokenizer turns each
  UTF-8 byte into one character, a BPE without merges maps that character to the byte's value, and the specials
  are added tokens at ByteTokenizer's ids. Encoding adds bos (as dsjax's sampler and data pipeline do)."""
  byte_tok = tokenizer_lib.ByteTokenizer()
  tok = tokenizers.Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(_byte_alphabet())}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = {byte_tok.pad_id: BYTE_SPECIAL_TOKENS['pad'], byte_tok.bos_id: BYTE_SPECIAL_TOKENS['bos'],
              byte_tok.eos_id: BYTE_SPECIAL_TOKENS['eos'],
              **dict(zip(byte_tok.fim_ids, tokenizer_lib.FIM_TOKEN_NAMES[1]))}
  tok.add_special_tokens([tokenizers.AddedToken(specials[i], special=True, normalized=False)
                          for i in sorted(specials)])  # added in id order: they get ids 256, 257, ...
  bos = specials[byte_tok.bos_id]
  tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', pair=f'{bos} $A {bos} $B',
                                                     special_tokens=[(bos, byte_tok.bos_id)])
  tok.encode_special_tokens = True  # '<s>' in a text is 3 bytes, as for ByteTokenizer (tokenizer.json does not
  # keep this flag: tokenizer_config.json's split_special_tokens asks transformers for the same)
  return tok


def _byte_tokenizer_mismatch(m: ml_collections.ConfigDict, ckpt_dir: str) -> str | None:
  """Why `byte_tokenizer()` cannot stand for this byte-level checkpoint's tokenizer, or None when it can."""
  byte_tok = tokenizer_lib.ByteTokenizer()
  if os.path.isfile(os.path.join(os.path.abspath(ckpt_dir), ORIGINAL_CONFIG)):
    return (f'the checkpoint was imported from a Hugging Face directory without tokenizer.json ({ORIGINAL_CONFIG}), '
            'so its ids follow that model\'s own tokenizer, not dsjax\'s bytes; copy that tokenizer\'s files there')
  if m.vocab_size < byte_tok.vocab_size:
    return (f'model.vocab_size={m.vocab_size} is smaller than the byte-level tokenizer\'s {byte_tok.vocab_size} ids')
  probe = ''.join(map(chr, range(128))) + ' é ß → 世界 🙂 <s></s><pad>'
  tok = byte_tokenizer()
  got = tok.encode(probe, add_special_tokens=False).ids
  if got != byte_tok.encode(probe).tolist() or tok.decode(got) != probe:
    return 'the tokenizers library encodes text to other ids than dsjax\'s byte-level tokenizer'
  return None


def write_byte_tokenizer(hf_dir: str, max_length: int) -> None:
  """tokenizer.json and tokenizer_config.json of `byte_tokenizer()`, which `transformers.AutoTokenizer` loads;
  `split_special_tokens` makes transformers encode special-token text as bytes too."""
  byte_tokenizer().save(os.path.join(hf_dir, 'tokenizer.json'))
  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': max_length,
            'split_special_tokens': True, 'clean_up_tokenization_spaces': False,
            **{f'{role}_token': name for role, name in BYTE_SPECIAL_TOKENS.items()},
            'additional_special_tokens': list(tokenizer_lib.FIM_TOKEN_NAMES[1])}
  with open(os.path.join(hf_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)


def _hf_tensor_bytes(m: ml_collections.ConfigDict, itemsize: int) -> dict[str, int]:
  shapes = _dsjax_shapes(m)
  sizes = {name: int(np.prod(shapes[t.path][len(t.lead):])) * itemsize for t in tensor_maps(m) for name in t.names()}
  sizes.update({copy: sizes[main] for copy, main in mtp_shared_copies(m).items()})
  return sizes


def _special_token_ids(cfg: ml_collections.ConfigDict, ckpt_dir: str) -> dict[str, int | None]:
  """bos/eos/pad ids for config.json: the HF tokenizer's; with the byte tokenizer, those of the HF config.json the
  checkpoint was imported from (kept as hf_config.json), else the byte ids that fit the vocabulary."""
  roles = ('bos', 'eos', 'pad')
  original = os.path.join(os.path.abspath(ckpt_dir), ORIGINAL_CONFIG)
  if cfg.data.tokenizer == 'byte' and os.path.isfile(original):
    with open(original) as f:
      hf = json.load(f)
    return {f'{r}_token_id': hf.get(f'{r}_token_id') for r in roles}
  tok = tokenizer_lib.from_config(cfg.data)
  ids = {'bos': tok.bos_id, 'eos': tok.eos_id, 'pad': tok.pad_id}
  return {f'{r}_token_id': int(ids[r]) if ids[r] < cfg.model.vocab_size else None for r in roles}


# ------------------------------------------------------------------------------------------------ CLI

def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m dsjax.convert.hf', description=__doc__.split('\n\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='HF directory -> dsjax checkpoint')
  imp.add_argument('hf_dir')
  imp.add_argument('out_dir')
  imp.add_argument('--param_dtype', default='float32', choices=sorted(_DTYPES),
                   help='dtype of the imported params (float32: training master weights; bfloat16: serving)')
  imp.add_argument('--config', default=None, help='base dsjax config file (default: configs/base.py)')
  exp = sub.add_parser('export', help='dsjax checkpoint -> HF directory')
  exp.add_argument('ckpt_dir')
  exp.add_argument('hf_dir')
  exp.add_argument('--dtype', default=None, choices=sorted(_DTYPES), help='default: the params dtype')
  exp.add_argument('--max_shard_size', default='5GB')
  args = parser.parse_args(argv)
  try:
    if args.command == 'import':
      cfg = import_hf(args.hf_dir, args.out_dir, base_config=args.config, param_dtype=args.param_dtype)
      m = cfg.model
      print(f'imported {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads ({m.num_kv_heads} KV), '
            f'vocab {m.vocab_size} -> {os.path.abspath(args.out_dir)}\n'
            f'train:  python train.py --config={os.path.join(os.path.abspath(args.out_dir), "config.py")}')
    else:
      export_hf(args.ckpt_dir, args.hf_dir, dtype=args.dtype, max_shard_size=args.max_shard_size)
      print(f'exported {os.path.abspath(args.ckpt_dir)} -> {os.path.abspath(args.hf_dir)}')
  except (ConversionError, config_lib.ConfigError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
