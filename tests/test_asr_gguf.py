"""asr.gguf_io: dequantisation against the gguf package, files written by its writer (llama.cpp's q/k row
permutation undone, logits against transformers), and the real SmolLM2-135M-Instruct Q4_1 file against
transformers' own GGUF loading."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from asr import gguf_io, llm
from tests.test_asr_llm import tiny_checkpoint, torch_logits

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


@pytest.mark.parametrize("type_name", TYPES)
def test_dequantize_equals_the_gguf_package(type_name):
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    data = np.random.default_rng(0).normal(0, 0.7, (6, 96)).astype(np.float32)
    data[0, :32] = 0.0  # an all-zero block (scale 0)
    raw = gguf.quants.quantize(data, qtype)
    ours = gguf_io.dequantize(raw, type_name, data.shape)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(raw, qtype).reshape(data.shape))
    tolerance = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[type_name]
    assert np.abs(ours - data).max() <= tolerance


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q and k."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, torch_model, type_name: str) -> None:
    """The tiny torch model as a llama GGUF file written by the gguf package (matrices in `type_name`,
    1-D norms in F32, as llama.cpp does)."""
    import gguf

    cfg = torch_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_eos_token_id(2)
    qtype = gguf.GGMLQuantizationType[type_name]
    for name, tensor in torch_model.state_dict().items():
        value = tensor.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            target = "output.weight"
        else:
            _, _, index, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            target = f"blk.{index}.{GGUF_NAMES[module]}.{leaf}"
            if module == "self_attn.q_proj":
                value = llama_cpp_permute(value, cfg.num_attention_heads)
            elif module == "self_attn.k_proj":
                value = llama_cpp_permute(value, cfg.num_key_value_heads)
        if value.ndim == 1 or type_name == "F32":
            writer.add_tensor(target, value)
        else:
            writer.add_tensor(target, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_written_file_round_trips(type_name, tied, tmp_path):
    import gguf

    _, torch_model = tiny_checkpoint(tmp_path / "hf", "llama", intermediate_size=96, tie_word_embeddings=tied)
    path = tmp_path / f"tiny.{type_name}.gguf"
    write_gguf(path, torch_model, type_name)
    config, tensors = gguf_io.load_llama(str(path))
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.vocab_size,
            config.tie_word_embeddings) == (4, 64, 2, 96, tied)
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:  # every tensor dequantises as the gguf package does
        shape = tuple(reversed(t.shape.tolist()))
        reference = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        np.testing.assert_array_equal(gguf_io.dequantize(t.data, t.tensor_type.name, shape), reference, t.name)
    original = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    tolerance = {"F32": 0, "F16": 1e-3, "Q8_0": 2e-3, "Q4_0": 2e-2, "Q4_1": 2e-2}[type_name]
    for name, value in tensors.items():  # q/k rows back in transformers' order
        np.testing.assert_allclose(value, original[name], atol=tolerance, err_msg=name)
    if type_name == "F32":
        lm = llm.CausalLM.from_pretrained(str(path))
        ids = np.random.default_rng(0).integers(3, 96, (2, 20))
        np.testing.assert_allclose(np.asarray(lm(ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)


def test_bad_files_are_refused(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(gguf_io.GGUFError, match="not a readable GGUF file"):
        gguf_io.load_llama(str(junk))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        gguf_io.load_llama(str(tmp_path / "missing.gguf"))
    with pytest.raises(gguf_io.GGUFError, match="GGML type Q5_K is not dequantised"):
        gguf_io.dequantize(np.zeros(176, np.uint8), "Q5_K", (256,))
    with pytest.raises(gguf_io.GGUFError, match="architecture 'gpt2'"):
        gguf_io.llama_config({"general.architecture": "gpt2"})


# --- the real SmolLM2-135M-Instruct Q4_1 file ---------------------------------------------------------------------

REAL = "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="module")
def real():
    """(path, our model, our tokenizer, transformers' model and tokenizer from the same file)."""
    import os

    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_io.resolve_gguf(REAL)
    directory, name = os.path.split(path)
    reference = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype="float32").eval()
    return (path, llm.CausalLM.from_pretrained(REAL), gguf_io.load_tokenizer(REAL),
            reference, AutoTokenizer.from_pretrained(directory, gguf_file=name))


def test_real_smollm2_config_matches_the_card(real):
    _, lm, _, reference, _ = real
    cfg = lm.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.rope_theta, cfg.tie_word_embeddings) == (30, 576, 9, 3, 1e5, True)
    assert cfg.vocab_size == reference.config.vocab_size and cfg.intermediate_size == reference.config.intermediate_size


def test_real_smollm2_logits_and_tokens_match_transformers_gguf_loading(real):
    import torch

    _, lm, tokenizer, reference, reference_tokenizer = real
    text = llm.chat_prompt(tokenizer, "What is the capital of France?")
    assert text == llm.chat_prompt(reference_tokenizer, "What is the capital of France?")
    ids = tokenizer(text, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ids, reference_tokenizer(text, return_tensors="np")["input_ids"])
    # transformers' model run in float64 is the exact value of the dequantised weights; float32 against float32
    # would add torch's own rounding (it differs with the CPU's GEMM kernels) to ours
    with torch.no_grad():
        expected = copy.deepcopy(reference).double()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(lm(ids)), expected, atol=1e-4, rtol=1e-4)


def test_real_smollm2_answers_the_capital_of_france(real):
    _, lm, tokenizer, _, _ = real
    ids = tokenizer(llm.chat_prompt(tokenizer, "What is the capital of France?"), return_tensors="np")["input_ids"]
    out = llm.generate(lm, ids, max_new_tokens=16)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert answer.startswith("The capital of France is Paris")


def test_offline_file_is_checked(tmp_path, monkeypatch):
    from encoders import pretrained

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"x" * 10)
    distribution, relative, size, sha = gguf_io.OFFLINE_GGUF[REAL]
    monkeypatch.setitem(gguf_io.OFFLINE_GGUF, REAL, (distribution, relative, 10, sha))
    import importlib.metadata

    class Located:
        def locate_file(self, _):
            return str(fake)

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Located())
    with pytest.raises(pretrained.IntegrityError, match="does not match its pinned size and SHA-256"):
        gguf_io.resolve_gguf(REAL)
