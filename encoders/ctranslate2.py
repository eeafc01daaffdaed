"""CTranslate2 Whisper models (faster-whisper's format) read without ctranslate2, as transformers tensors.

`model.bin`, binary format version 6 (little-endian): u32 version; spec name and every later string as
u16 length + bytes (NUL-terminated); u32 spec revision; u32 variable count, each variable a name, u8 rank,
rank x u32 dims, u8 dtype (0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16), u32 byte count and the raw data;
u32 alias count and (alias, target) name pairs. Quantised models store a linear `weight` as int8 with a
float `weight_scale` per output row; it is dequantised here (weight / scale), so every consumer sees
float tensors. `to_transformers(variables)` renames and splits the fused projections into the tensor
names of transformers' `WhisperForConditionalGeneration` (prefix `model.`), so the checkpoint loads
through the same code as a Hugging Face directory.
"""

from __future__ import annotations

import re
import struct

import ml_dtypes
import numpy as np

FORMAT_VERSION = 6
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: ml_dtypes.bfloat16}


class CorruptModelError(ValueError):
    """A CTranslate2 model file that does not parse (truncated, wrong format or inconsistent)."""


class _Reader:
    def __init__(self, data: bytes | memoryview, source: str):
        self.data, self.pos, self.source = memoryview(data), 0, source

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CorruptModelError(f"{self.source} is truncated: needs {self.pos + n} bytes, has {len(self.data)}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def string(self) -> str:
        (n,) = self.unpack("H")
        raw = bytes(self.take(n))
        if not raw.endswith(b"\0"):
            raise CorruptModelError(f"{self.source}: a string at byte {self.pos - n} is not NUL-terminated")
        return raw[:-1].decode("utf-8")


def read_model_bin(data: bytes | memoryview, source: str = "model.bin") -> tuple[str, int, dict[str, np.ndarray]]:
    """Parses a CTranslate2 `model.bin` -> (spec name, spec revision, variables with aliases resolved).

    Raises `CorruptModelError` on any inconsistency (truncation, unknown dtype, size mismatch, trailing bytes).
    """
    reader = _Reader(data, source)
    (version,) = reader.unpack("I")
    if version != FORMAT_VERSION:
        raise CorruptModelError(f"{source}: CTranslate2 binary format version {version}; only {FORMAT_VERSION} is "
                                "supported (re-convert with ctranslate2 >= 3)")
    spec = reader.string()
    (revision,) = reader.unpack("I")
    (count,) = reader.unpack("I")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = reader.string()
        (rank,) = reader.unpack("B")
        shape = reader.unpack(f"{rank}I") if rank else ()
        dtype_id, num_bytes = reader.unpack("BI")
        if dtype_id not in _DTYPES:
            raise CorruptModelError(f"{source}: variable {name!r} has unknown dtype id {dtype_id}")
        dtype = np.dtype(_DTYPES[dtype_id])
        if num_bytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CorruptModelError(f"{source}: variable {name!r} of shape {shape} and dtype {dtype} declares "
                                    f"{num_bytes} bytes")
        variables[name] = np.frombuffer(reader.take(num_bytes), dtype).reshape(shape)
    (aliases,) = reader.unpack("I")
    for _ in range(aliases):
        alias, target = reader.string(), reader.string()
        if target not in variables:
            raise CorruptModelError(f"{source}: alias {alias!r} points to unknown variable {target!r}")
        variables[alias] = variables[target]
        if target + "_scale" in variables:  # an aliased int8 weight shares its target's scale
            variables[alias + "_scale"] = variables[target + "_scale"]
    if reader.pos != len(reader.data):
        raise CorruptModelError(f"{source}: {len(reader.data) - reader.pos} unexpected bytes after the aliases")
    return spec, revision, variables


def dequantize(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float32 `weight` for every int8/int16 `weight` with a `weight_scale` (per output row); drops the scales."""
    out = {}
    for name, value in variables.items():
        if name.endswith("/weight_scale"):
            continue
        scale = variables.get(name + "_scale") if name.endswith("/weight") else None
        if scale is not None:
            scale = np.asarray(scale, np.float32)
            value = value.astype(np.float32) / (scale.reshape(-1, *([1] * (value.ndim - 1))) if scale.ndim else scale)
        elif value.dtype in (np.int8, np.int16) and name.endswith("/weight"):
            raise CorruptModelError(f"quantised {name} has no {name}_scale")
        out[name] = value
    return out


def _linear(tensors: dict, variables: dict, ct2: str, hf: str, bias: bool = True) -> None:
    tensors[f"{hf}.weight"] = variables[f"{ct2}/weight"]
    if bias:
        tensors[f"{hf}.bias"] = variables[f"{ct2}/bias"]


def _layer_norm(tensors: dict, variables: dict, ct2: str, hf: str) -> None:
    tensors[f"{hf}.weight"] = variables[f"{ct2}/gamma"]
    tensors[f"{hf}.bias"] = variables[f"{ct2}/beta"]


def _split(weight: np.ndarray, parts: int) -> list[np.ndarray]:
    if weight.shape[0] % parts:
        raise CorruptModelError(f"fused projection of {weight.shape[0]} rows does not split into {parts}")
    return np.split(weight, parts)


def _attention(tensors: dict, variables: dict, ct2: str, hf: str, fused: tuple[str, ...], first: int) -> None:
    """Splits fused `linear_{first}` rows into the named projections (Whisper's k_proj has no bias)."""
    weights = _split(variables[f"{ct2}/linear_{first}/weight"], len(fused))
    biases = _split(variables[f"{ct2}/linear_{first}/bias"], len(fused))
    for proj, w, b in zip(fused, weights, biases):
        tensors[f"{hf}.{proj}.weight"] = w
        if proj != "k_proj":
            tensors[f"{hf}.{proj}.bias"] = b


def num_layers(variables: dict, stack: str) -> int:
    """Number of `stack/layer_N/` blocks."""
    found = {int(m.group(1)) for name in variables if (m := re.match(rf"{stack}/layer_(\d+)/", name))}
    if found != set(range(len(found))):
        raise CorruptModelError(f"{stack} layers are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def to_transformers(variables: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CTranslate2 Whisper variables (dequantised) -> transformers `WhisperForConditionalGeneration` tensors."""
    t: dict[str, np.ndarray] = {}
    try:
        for stack in ("encoder", "decoder"):
            hf = f"model.{stack}"
            t[f"{hf}.embed_positions.weight"] = variables[f"{stack}/position_encodings/encodings"]
            _layer_norm(t, variables, f"{stack}/layer_norm", f"{hf}.layer_norm")
            for i in range(num_layers(variables, stack)):
                ct2, layer = f"{stack}/layer_{i}", f"{hf}.layers.{i}"
                _layer_norm(t, variables, f"{ct2}/self_attention/layer_norm", f"{layer}.self_attn_layer_norm")
                _attention(t, variables, f"{ct2}/self_attention", f"{layer}.self_attn", ("q_proj", "k_proj", "v_proj"), 0)
                _linear(t, variables, f"{ct2}/self_attention/linear_1", f"{layer}.self_attn.out_proj")
                if stack == "decoder":
                    _layer_norm(t, variables, f"{ct2}/attention/layer_norm", f"{layer}.encoder_attn_layer_norm")
                    _attention(t, variables, f"{ct2}/attention", f"{layer}.encoder_attn", ("q_proj",), 0)
                    _attention(t, variables, f"{ct2}/attention", f"{layer}.encoder_attn", ("k_proj", "v_proj"), 1)
                    _linear(t, variables, f"{ct2}/attention/linear_2", f"{layer}.encoder_attn.out_proj")
                _layer_norm(t, variables, f"{ct2}/ffn/layer_norm", f"{layer}.final_layer_norm")
                _linear(t, variables, f"{ct2}/ffn/linear_0", f"{layer}.fc1")
                _linear(t, variables, f"{ct2}/ffn/linear_1", f"{layer}.fc2")
        for conv in ("conv1", "conv2"):
            _linear(t, variables, f"encoder/{conv}", f"model.encoder.{conv}")
        t["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    except KeyError as e:
        raise CorruptModelError(f"not a CTranslate2 Whisper model: variable {e.args[0]!r} is missing") from e
    return t


def whisper_dimensions(variables: dict[str, np.ndarray]) -> dict:
    """transformers `WhisperConfig` size fields read off the tensors and the stored head counts."""
    enc_pos, dec_pos = variables["encoder/position_encodings/encodings"], variables["decoder/position_encodings/encodings"]
    conv1 = variables["encoder/conv1/weight"]
    return {
        "vocab_size": int(variables["decoder/embeddings/weight"].shape[0]),
        "num_mel_bins": int(conv1.shape[1]), "d_model": int(enc_pos.shape[1]),
        "encoder_layers": num_layers(variables, "encoder"), "decoder_layers": num_layers(variables, "decoder"),
        "encoder_attention_heads": int(variables["encoder/num_heads"]),
        "decoder_attention_heads": int(variables["decoder/num_heads"]),
        "encoder_ffn_dim": int(variables["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "decoder_ffn_dim": int(variables["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        "max_source_positions": int(enc_pos.shape[0]), "max_target_positions": int(dec_pos.shape[0]),
    }
