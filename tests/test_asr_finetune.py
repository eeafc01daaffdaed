"""asr.finetune: loss and gradients against transformers' PyTorch Whisper, AdamW against NumPy, exact resume,
cached encoder states, bad input, and the finetune_whisper / export_hf binaries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from asr import finetune as ft
from asr import merging, training
from asr.whisper_pipeline import WhisperTokens
from encoders.input_pipeline import Example
from tests.asr_testutil import tiny_whisper_asr
from tests.training_testutil import killed_after

TEXTS = ["hello world", "the cat sat on the mat", "um I I was going to the the shop"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, torch model) of a tiny random multilingual Whisper with realistic initialisation."""
    from transformers import WhisperFeatureExtractor

    path = tmp_path_factory.mktemp("tiny_whisper")
    model = tiny_whisper_asr(path, init_std=0.02)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(str(path))  # the release layout's preprocessor file
    return str(path), model


def clips(n=3):
    rng = np.random.default_rng(0)
    return [Example(id=f"clip{i}", lang="en", text=TEXTS[i % 3],
                    audio=rng.normal(0, 0.1, 8000 * (2 + i)).astype(np.float32), num_samples=8000 * (2 + i))
            for i in range(n)]


def labelled(model_dir, model, examples):
    from transformers import WhisperTokenizer

    tokens = WhisperTokens.from_model_dir(model_dir, model.decoder.config.vocab_size)
    return ft.label_clips(examples, tokens, WhisperTokenizer.from_pretrained(model_dir),
                          input_samples=model.input_samples, max_positions=model.decoder.config.max_target_positions)


def torch_loss_and_grads(torch_model, mel, tokens, mask):
    """transformers' loss (labels = the next tokens, -100 on the prompt and padding) and its gradients."""
    import torch

    torch_model.zero_grad()
    labels = torch.tensor(np.where(mask[:, 1:] > 0, tokens[:, 1:], -100)).long()
    out = torch_model(input_features=torch.tensor(mel), decoder_input_ids=torch.tensor(tokens[:, :-1]).long(),
                      labels=labels)
    out.loss.backward()
    return float(out.loss), {n: p.grad.numpy().copy() for n, p in torch_model.named_parameters() if p.grad is not None}


def test_labels_score_only_the_transcript_and_end_token(tiny):
    model_dir, _ = tiny
    model = ft.WhisperSeq2Seq.from_pretrained(model_dir)
    data = labelled(model_dir, model, clips())
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(model_dir)
    for row, text in zip(range(3), TEXTS):
        text_ids = tok.encode(" " + text, add_special_tokens=False)
        expected = [tok.convert_tokens_to_ids(t) for t in
                    ("<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>")] + text_ids + [50257]
        assert data.tokens[row, : len(expected)].tolist() == expected
        assert data.mask[row].tolist() == [0.0] * 4 + [1.0] * (len(expected) - 4) + [0.0] * (
            data.tokens.shape[1] - len(expected))
    assert data.tokens.shape[1] % 8 == 0 and data.tokens.shape[1] >= max(data.mask.sum(1)) + 4


def test_loss_and_gradients_match_transformers(tiny):
    model_dir, torch_model = tiny
    model = ft.WhisperSeq2Seq.from_pretrained(model_dir)
    data = labelled(model_dir, model, clips())
    mel = np.stack([ft.log_mel(model, e.audio) for e in data.examples])
    names = ft.trainable_names(model, "all")
    loss, grads = ft.loss_and_grads(model, names, data.tokens, data.mask, mel=mel)
    ref_loss, ref_grads = torch_loss_and_grads(torch_model, mel, data.tokens, data.mask)
    assert abs(loss - ref_loss) < 1e-4
    assert set(grads) == set(ref_grads)  # every trainable tensor (transformers freezes the encoder positions too)
    for name, g in grads.items():
        np.testing.assert_allclose(g, ref_grads[name], atol=1e-4, rtol=0, err_msg=name)
    assert max(np.abs(g).max() for g in ref_grads.values()) > 1e-2  # the gradients are not trivially ~0

    bf16 = ft.WhisperSeq2Seq.from_pretrained(model_dir, compute_dtype="bfloat16")
    loss16, _ = ft.loss_and_grads(bf16, ["model.decoder.layer_norm.weight"], data.tokens, data.mask, mel=mel)
    assert abs(loss16 - ref_loss) < 2e-2 * ref_loss


def test_trainable_sets_and_weight_decay_follow_the_parameter_names(tiny):
    model_dir, torch_model = tiny
    model = ft.WhisperSeq2Seq.from_pretrained(model_dir)
    torch_names = [n for n, _ in torch_model.named_parameters()]
    attention = re.compile(r"(self_attn|encoder_attn)\.(q|k|v|out)_proj\.")
    expected = {
        "all": [n for n in torch_names if n != "model.encoder.embed_positions.weight"],
        "attention": [n for n in torch_names if attention.search(n)],
        "decoder": [n for n in torch_names if n.startswith("model.decoder.") and "embed" not in n],
        "frozen_encoder": [n for n in torch_names if n.startswith("model.decoder.")],
        "decoder_attention": [n for n in torch_names if n.startswith("model.decoder.") and attention.search(n)],
    }
    for name, want in expected.items():
        assert ft.trainable_names(model, name) == sorted(want), name
    assert [n for n in torch_names if not ft.decays(n)] == [n for n in torch_names if "norm" in n or n.endswith("bias")]
    with pytest.raises(ValueError, match="unknown trainable set"):
        ft.trainable_names(model, "heads")


def test_one_step_is_adamw_with_clipping_and_masked_decay(tiny):
    model_dir, torch_model = tiny
    examples = clips()
    config = ft.FinetuneConfig(trainable="decoder", steps=1, warmup_steps=0, batch_size=3, learning_rate=1e-3,
                               weight_decay=0.1, clip_norm=0.5)
    model = ft.WhisperSeq2Seq.from_pretrained(model_dir)
    before = model.state_dict()
    data = labelled(model_dir, model, examples)
    mel = np.stack([ft.log_mel(model, e.audio) for e in examples])
    _, grads = torch_loss_and_grads(torch_model, mel, data.tokens, data.mask)
    names = ft.trainable_names(model, "decoder")
    norm = np.sqrt(sum(float((grads[n].astype(np.float64) ** 2).sum()) for n in names))
    assert norm > config.clip_norm  # clipping is active
    after = ft.finetune(model, examples, config, tokenizer_dir=model_dir, progress=False).model.state_dict()
    for name in before:
        if name not in names:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
            continue
        g = grads[name] * (config.clip_norm / norm)
        step = g / (np.abs(g) + config.adam_eps) + (config.weight_decay * before[name] if ft.decays(name) else 0)
        np.testing.assert_allclose(after[name], before[name] - config.learning_rate * step, atol=2e-6, err_msg=name)


def test_schedule_is_linear_warmup_then_linear_decay(tiny):
    model_dir, _ = tiny
    config = ft.FinetuneConfig(trainable="decoder_attention", steps=6, warmup_steps=2, batch_size=2,
                               learning_rate=1e-3)
    info = ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                       progress=False).info
    np.testing.assert_allclose(info["learning_rates"], [0, 5e-4, 1e-3, 7.5e-4, 5e-4, 2.5e-4], rtol=1e-6)
    assert info["flops_per_step"] > 0 and info["compile_seconds"] > 0 and len(info["losses"]) == 6


def test_cached_encoder_states_train_the_same_model(tiny):
    model_dir, _ = tiny
    config = ft.FinetuneConfig(trainable="decoder_attention", steps=4, warmup_steps=1, batch_size=2,
                               learning_rate=1e-3)
    plain = ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                        progress=False)
    cached = ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(),
                         ft.FinetuneConfig(**{**config.__dict__, "cache_encoder_states": True}),
                         tokenizer_dir=model_dir, progress=False)
    np.testing.assert_allclose(cached.info["losses"], plain.info["losses"], rtol=1e-5)
    for name, value in plain.model.state_dict().items():
        np.testing.assert_allclose(cached.model.state_dict()[name], value, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="frozen encoder"):
        ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(),
                    ft.FinetuneConfig(trainable="attention", cache_encoder_states=True), tokenizer_dir=model_dir)


def test_precomputed_encoder_states_from_transformers_train_the_same_model(tiny):
    """States computed outside (here by transformers' PyTorch encoder) train exactly as the internal cache."""
    import torch

    model_dir, torch_model = tiny
    model = ft.WhisperSeq2Seq.from_pretrained(model_dir)
    mel = np.stack([ft.log_mel(model, e.audio) for e in clips()])
    with torch.no_grad():
        states = torch_model.model.encoder(torch.tensor(mel)).last_hidden_state.numpy()
    config = ft.FinetuneConfig(trainable="decoder_attention", steps=3, warmup_steps=1, batch_size=2,
                               learning_rate=1e-3, cache_encoder_states=True)
    internal = ft.finetune(model, clips(), config, tokenizer_dir=model_dir, progress=False)
    external = ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                           progress=False, encoder_states=states)
    np.testing.assert_allclose(external.info["losses"], internal.info["losses"], rtol=1e-4)
    with pytest.raises(ValueError, match=r"encoder_states must be \(clips, positions, d_model\)"):
        ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                    progress=False, encoder_states=states[:2])
    with pytest.raises(ValueError, match="cache_encoder_states is off"):
        ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(),
                    ft.FinetuneConfig(trainable="decoder_attention", steps=3, warmup_steps=1),
                    tokenizer_dir=model_dir, progress=False, encoder_states=states)


def test_kill_and_resume_equals_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    model_dir, _ = tiny
    config = ft.FinetuneConfig(trainable="attention", steps=7, warmup_steps=2, batch_size=2, learning_rate=1e-3,
                               checkpoint_every=2)
    reference = ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                            progress=False)
    ckpt = str(tmp_path / "ckpt")
    with killed_after(monkeypatch, training, 5):
        ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                    checkpoint_dir=ckpt, progress=False)
    assert sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) == [2, 4]  # step 5 was lost with the kill
    resumed = ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(), config, tokenizer_dir=model_dir,
                          checkpoint_dir=ckpt, progress=False)
    assert resumed.info["resumed_from"] == 4
    assert resumed.info["losses"] == reference.info["losses"][4:]
    for name, value in reference.model.state_dict().items():
        np.testing.assert_array_equal(resumed.model.state_dict()[name], value, err_msg=name)
    restored, base, step = ft.restore_checkpoint(ckpt)
    assert (base, step) == (model_dir, 7)
    for name, value in reference.model.state_dict().items():
        np.testing.assert_array_equal(restored.state_dict()[name], value, err_msg=name)
    with pytest.raises(ValueError, match="different run"):
        ft.finetune(ft.WhisperSeq2Seq.from_pretrained(model_dir), clips(),
                    ft.FinetuneConfig(**{**config.__dict__, "learning_rate": 2e-3}), tokenizer_dir=model_dir,
                    checkpoint_dir=ckpt, progress=False)


def test_bad_training_input_is_named(tiny):
    model_dir, _ = tiny
    model = ft.WhisperSeq2Seq.from_pretrained(model_dir)
    good = clips()
    bad_cases = [
        ([Example(id="silent", lang="en", text="  ", audio=good[0].audio, num_samples=16000)], "silent.*no transcript"),
        ([Example(id="long", lang="en", text="hi", audio=good[0].audio, num_samples=31 * 16000)], "long.*31.00 s"),
        ([Example(id="x", lang="xx", text="hi", audio=good[0].audio, num_samples=16000)], "language 'xx'"),
        ([Example(id="chatty", lang="en", text="word " * 80, audio=good[0].audio, num_samples=16000)],
         "64 positions.*chatty \\(85 tokens\\)"),
    ]
    for examples, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            labelled(model_dir, model, examples)
    with pytest.raises(ValueError, match="warmup_steps"):
        ft.FinetuneConfig(steps=5, warmup_steps=5).check()
    with pytest.raises(ValueError, match="compute_dtype"):
        ft.FinetuneConfig(compute_dtype="float16").check()


def test_binaries_write_a_directory_transformers_loads_with_our_logits(tiny, tmp_path):
    import torch
    import transformers

    model_dir, _ = tiny
    rows = []
    for e in clips(4):
        path = tmp_path / f"{e.id}.wav"
        sf.write(path, e.audio, 16000)
        rows.append(dict(id=e.id, lang="en", text=e.text, audio_path=str(path), split="train"))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run = [sys.executable, "-m", "experiments.finetune_whisper", f"--model={model_dir}",
           f"--train_manifest={manifest}", "--split=train", "--trainable=all", "--steps=3", "--warmup_steps=1",
           "--batch_size=2", "--learning_rate=1e-3", f"--output_dir={out}"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "finetune.json").read_text())
    assert len(info["losses"]) == 3 and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    exported = tmp_path / "exported"
    done = subprocess.run([sys.executable, "-m", "experiments.export_hf", f"--model={out / 'checkpoints'}",
                           f"--output_dir={exported}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = merging.load_state(str(out / "model"))
    base = merging.load_state(model_dir)
    assert all(np.array_equal(v, merging.load_state(str(exported))[k]) for k, v in trained.items())
    assert any(not np.array_equal(v, base[k]) for k, v in trained.items())

    hf = transformers.WhisperForConditionalGeneration.from_pretrained(str(out / "model")).eval()
    transformers.WhisperProcessor.from_pretrained(str(out / "model"))
    ours = ft.WhisperSeq2Seq.from_pretrained(str(out / "model"))
    mel = np.stack([ft.log_mel(ours, clips(1)[0].audio)])
    tokens = np.array([[50258, 50259, 50359, 50363, 7751]], np.int32)
    with torch.no_grad():
        expected = hf(input_features=torch.tensor(mel), decoder_input_ids=torch.tensor(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours.logits(tokens, ours.encode(mel))), expected, atol=1e-4)
