"""asr.llm against transformers' PyTorch Llama / SmolLM3: logits (GQA, NoPE layers, tied / untied, RoPE scalings,
left padding), greedy generation token for token with the KV cache, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from asr import llm

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def tiny_checkpoint(path, kind: str = "llama", **overrides):
    """(directory, torch model) of a tiny random Llama or SmolLM3 saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, SmolLM3Config, SmolLM3ForCausalLM

    torch.manual_seed(0)
    fields = {**TINY, **overrides}
    if kind == "smollm3":
        model = SmolLM3ForCausalLM(SmolLM3Config(**fields))
    else:
        model = LlamaForCausalLM(LlamaConfig(**fields))
    with torch.no_grad():  # norms away from 1 so a wrong norm placement shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(str(path))
    return str(path), model


def torch_logits(model, ids, mask=None, positions=None):
    import torch

    kw = {}
    if mask is not None:
        kw["attention_mask"] = torch.tensor(mask)
    if positions is not None:
        kw["position_ids"] = torch.tensor(positions)
    with torch.no_grad():
        return model(torch.tensor(ids), **kw).logits.numpy()


def random_ids(shape, seed=0):
    return np.random.default_rng(seed).integers(3, TINY["vocab_size"], shape)


CASES = {
    "llama untied, GQA": ("llama", dict(tie_word_embeddings=False)),
    "llama tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3 RoPE scaling": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0,
                                                               low_freq_factor=1.0, high_freq_factor=4.0,
                                                               original_max_position_embeddings=16))),
    "linear RoPE scaling": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4, factor=2.0))),
    "smollm3 NoPE every 2nd layer, tied": ("smollm3", dict(no_rope_layer_interval=2, tie_word_embeddings=True)),
    "smollm3 explicit NoPE mask, untied": ("smollm3", dict(no_rope_layers=[0, 1, 1, 0], tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    path, torch_model = tiny_checkpoint(tmp_path, kind, **overrides)
    lm = llm.CausalLM.from_pretrained(path)
    ids = random_ids((2, 40))
    np.testing.assert_allclose(np.asarray(lm(ids)), torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)


def test_nope_layers_follow_the_config(tmp_path):
    path, torch_model = tiny_checkpoint(tmp_path, "smollm3", no_rope_layer_interval=2)
    lm = llm.CausalLM.from_pretrained(path)
    assert [layer.self_attn.use_rope for layer in lm.model.layers] == \
        [bool(torch_model.model.layers[i].self_attn.use_rope) for i in range(4)] == [True, False, True, False]


def test_left_padding_matches_transformers_on_real_tokens(tmp_path):
    path, torch_model = tiny_checkpoint(tmp_path, "llama")
    lm = llm.CausalLM.from_pretrained(path)
    ids = random_ids((2, 12), seed=1)
    mask = np.ones((2, 12), np.int64)
    mask[1, :5] = 0
    ids[1, :5] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ours = np.asarray(lm(ids, attention_mask=mask))
    ref = torch_logits(torch_model, ids, mask, positions)
    np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, overrides", [("llama", dict(tie_word_embeddings=False)),
                                             ("smollm3", dict(no_rope_layer_interval=2, tie_word_embeddings=True))])
def test_greedy_generation_equals_transformers_generate(kind, overrides, tmp_path):
    import torch

    path, torch_model = tiny_checkpoint(tmp_path, kind, **overrides)
    lm = llm.CausalLM.from_pretrained(path)
    ids = random_ids((2, 7), seed=2)
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    ids[0, :3] = 0
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                                   do_sample=False, eos_token_id=2, pad_token_id=0).numpy()
    ours = llm.generate(lm, ids, max_new_tokens=12, attention_mask=mask, eos_token_id=2, pad_token_id=0)
    assert ours.shape == (2, 7 + 12)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()  # transformers stopped early only if every row ended: pads
    assert ref.shape[1] - 7 >= 2  # the cache was used over several steps


def test_generation_stops_at_eos_and_pads(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "llama")
    lm = llm.CausalLM.from_pretrained(path)
    ids = random_ids((1, 5), seed=3)
    free = llm.generate(lm, ids, max_new_tokens=6, eos_token_id=[], pad_token_id=0)[0, 5:]
    stop = int(free[2])  # make the third generated token the end of sequence
    out = llm.generate(lm, ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)[0, 5:]
    first = int(np.flatnonzero(free == stop)[0])
    np.testing.assert_array_equal(out[: first + 1], free[: first + 1])
    assert (out[first + 1:] == 0).all()


def test_bad_input_is_refused(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "llama")
    lm = llm.CausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="exceeds the model's 128 positions"):
        llm.generate(lm, random_ids((1, 120)), max_new_tokens=16)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        llm.generate(lm, np.array([[5, 96]]))
    with pytest.raises(ValueError, match="input_ids must be"):
        llm.generate(lm, np.array([5, 6]))
    with pytest.raises(ValueError, match=r"embeddings must be \(batch, length, 64\)"):
        llm.generate_from_embeds(lm, np.zeros((1, 3, 32), np.float32))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        llm.LlamaConfig.from_dict({"model_type": "gpt2", "num_attention_heads": 2, "num_hidden_layers": 1})
    with pytest.raises(ValueError, match="RoPE type 'yarn'"):
        llm.LlamaConfig.from_dict({**TINY, "model_type": "llama", "rope_parameters": {"rope_type": "yarn",
                                                                                      "rope_theta": 1e4}})
