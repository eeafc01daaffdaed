"""asr.llm_asr: the projectors against PyTorch modules, the seed's parameter count, the answer-only loss against
transformers' Llama fed the same embeddings, prompt splicing in the real chat template, exact resume."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from asr import llm, llm_asr, training
from tests.test_asr_llm import tiny_checkpoint
from tests.training_testutil import killed_after


def test_conv_mlp_has_the_seed_parameter_count():
    config = llm_asr.ProjectorConfig(kind="conv_mlp", encoder_dim=1280, llm_dim=2048)
    projector = nnx.eval_shape(lambda: llm_asr.Projector(config, rngs=nnx.Rngs(0)))
    assert llm_asr.parameter_count(projector) == 11_730_944
    assert config.positions(1500) == 750


def torch_projector(projector: llm_asr.Projector):
    """The same projector written with torch.nn (tiny-audio's / SLAM-ASR's modules) and our weights."""
    import torch

    cfg = projector.config
    w1 = torch.tensor(np.asarray(projector.linear_1.kernel.get_value()).T)
    w2 = torch.tensor(np.asarray(projector.linear_2.kernel.get_value()).T)
    lin1 = torch.nn.Linear(*reversed(w1.shape), bias=False)
    lin2 = torch.nn.Linear(*reversed(w2.shape), bias=False)
    lin1.weight.data, lin2.weight.data = w1, w2
    norm = torch.nn.RMSNorm(cfg.llm_dim, eps=cfg.norm_eps) if cfg.output_norm else torch.nn.Identity()
    if cfg.kind == "conv_mlp":
        conv = torch.nn.Conv1d(cfg.encoder_dim, cfg.encoder_dim, 3, stride=2, padding=1, bias=False)
        conv.weight.data = torch.tensor(np.asarray(projector.conv.kernel.get_value()).transpose(2, 1, 0).copy())

        def forward(x):
            y = conv(x.transpose(1, 2)).transpose(1, 2)
            return norm(lin2(torch.nn.functional.gelu(lin1(y))))
    else:
        def forward(x):
            b, t, e = x.shape
            t = t // cfg.stack * cfg.stack
            return norm(lin2(torch.relu(lin1(x[:, :t].reshape(b, t // cfg.stack, cfg.stack * e)))))
    return forward


@pytest.mark.parametrize("config", [
    llm_asr.ProjectorConfig(kind="conv_mlp", encoder_dim=24, llm_dim=40),
    llm_asr.ProjectorConfig(kind="conv_mlp", encoder_dim=24, llm_dim=40, output_norm=True),
    llm_asr.ProjectorConfig(kind="frame_stack", encoder_dim=24, llm_dim=40, hidden_dim=56, stack=5),
    llm_asr.ProjectorConfig(kind="frame_stack", encoder_dim=24, llm_dim=40, hidden_dim=56, stack=3,
                            output_norm=True)], ids=["conv", "conv+norm", "stack5", "stack3+norm"])
def test_projector_matches_torch_modules(config):
    import torch

    projector = llm_asr.Projector(config, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 23, 24)).astype(np.float32)
    ours = np.asarray(projector(x))
    with torch.no_grad():
        ref = torch_projector(projector)(torch.tensor(x)).numpy()
    assert ours.shape == ref.shape == (2, config.positions(23), 40)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)
    init = np.asarray(projector.linear_2.kernel.get_value())
    assert abs(init.std() - 0.02) < 0.003  # N(0, 0.02) as tiny-audio


def test_keep_frames_covers_the_longest_clip():
    assert llm_asr.keep_frames([16000 * 4, 16000 * 2], margin_frames=8) == 208  # 200 + 8 -> multiple of 16
    assert llm_asr.keep_frames([16000 * 30]) == 1500


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path, torch_model = tiny_checkpoint(tmp_path_factory.mktemp("lm"), "llama", tie_word_embeddings=True)
    return llm.CausalLM.from_pretrained(path), torch_model


PROMPT = llm_asr.ChatPrompt(prefix=(5, 6, 7), suffix=(8, 9), end_of_turn=2)


def test_answer_loss_scores_only_the_answer(tiny_lm):
    import torch

    lm, torch_model = tiny_lm
    projector = llm_asr.Projector(llm_asr.ProjectorConfig(encoder_dim=16, llm_dim=64), rngs=nnx.Rngs(1))
    states = np.random.default_rng(0).normal(size=(2, 10, 16)).astype(np.float32)
    ids = np.array([[11, 12, 13, 2, 2, 2], [21, 22, 23, 24, 25, 2]], np.int32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], np.float32)
    loss = float(llm_asr.answer_loss(lm, projector, PROMPT, states, ids, mask))
    embeds = np.asarray(llm_asr.spliced_embeddings(lm, projector, PROMPT, states, ids))
    assert embeds.shape == (2, 3 + 5 + 2 + 6, 64)
    np.testing.assert_allclose(embeds[:, :3], np.asarray(lm.embed(np.array([[5, 6, 7]] * 2))))
    with torch.no_grad():
        logits = torch_model(inputs_embeds=torch.tensor(embeds)).logits.numpy()
    start = 3 + 5 + 2  # the first answer token is predicted from the last suffix position
    scored = logits[:, start - 1: start - 1 + 6]
    logp = scored - np.log(np.exp(scored - scored.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        scored.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, ids[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, (nll * mask).sum() / mask.sum(), rtol=1e-5)


def test_answer_tokens_append_end_of_turn_and_mask_padding():
    class Tokenizer:  # whitespace "tokenizer": word lengths as ids
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) + 10 for w in text.split()]}

    ids, mask = PROMPT.answer_tokens(Tokenizer(), ["a bb ccc", "dddd"])
    np.testing.assert_array_equal(ids[:, :4], [[11, 12, 13, 2], [14, 2, 2, 2]])
    np.testing.assert_array_equal(mask[:, :4], [[1, 1, 1, 1], [1, 1, 0, 0]])
    assert ids.shape == (2, 8) and mask[:, 4:].sum() == 0
    with pytest.raises(ValueError, match="more than the 2 allowed"):
        PROMPT.answer_tokens(Tokenizer(), ["a bb ccc"], length=3)


def test_chat_prompt_splits_the_real_template_around_the_audio():
    from asr import gguf_io

    tokenizer = gguf_io.load_tokenizer("smollm2-135m-instruct-q4_1")
    vocabulary = len(tokenizer)
    prompt = llm_asr.ChatPrompt.from_tokenizer(tokenizer)
    text = llm.chat_prompt(tokenizer, "Transcribe: " + llm_asr.PLACEHOLDER)
    before, after = text.split(llm_asr.PLACEHOLDER)
    assert tokenizer.decode(list(prompt.prefix)) == before and tokenizer.decode(list(prompt.suffix)) == after
    assert after.endswith("<|im_start|>assistant\n") and before.rstrip().endswith("Transcribe:")
    assert tokenizer.convert_ids_to_tokens(prompt.end_of_turn) == "<|im_end|>"
    assert len(tokenizer) == vocabulary <= 49152  # no token was added: the placeholder is never tokenised


def test_training_moves_only_the_projector_and_resumes_exactly(tiny_lm, tmp_path, monkeypatch):
    lm, _ = tiny_lm
    lm_before = jax.tree.map(np.asarray, nnx.state(lm, nnx.Param))
    rng = np.random.default_rng(0)
    states = rng.normal(size=(5, 10, 16)).astype(np.float32)
    ids = rng.integers(10, 90, (5, 8)).astype(np.int32)
    mask = np.ones((5, 8), np.float32)
    config = llm_asr.ProjectorTrainConfig(steps=7, batch_size=2, warmup_steps=2, learning_rate=1e-2,
                                          checkpoint_every=2)
    make = lambda: llm_asr.Projector(llm_asr.ProjectorConfig(encoder_dim=16, llm_dim=64), rngs=nnx.Rngs(3))
    reference = llm_asr.train_projector(lm, make(), PROMPT, states, ids, mask, config, progress=False)
    assert reference.info["losses"][-1] < reference.info["losses"][0]
    ckpt = str(tmp_path / "ckpt")
    with killed_after(monkeypatch, training, 5):
        llm_asr.train_projector(lm, make(), PROMPT, states, ids, mask, config, checkpoint_dir=ckpt, progress=False)
    assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [2, 4]
    resumed = llm_asr.train_projector(lm, make(), PROMPT, states, ids, mask, config, checkpoint_dir=ckpt,
                                      progress=False)
    assert resumed.info["resumed_from"] == 4 and resumed.info["losses"] == reference.info["losses"][4:]
    for a, b in zip(jax.tree.leaves(nnx.state(resumed.projector, nnx.Param)),
                    jax.tree.leaves(nnx.state(reference.projector, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(lm_before), jax.tree.leaves(nnx.state(lm, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(b))  # the LLM stayed frozen
    with pytest.raises(ValueError, match="states must be"):
        llm_asr.train_projector(lm, make(), PROMPT, states[..., :8], ids, mask, config, progress=False)
