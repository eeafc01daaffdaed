"""Greedy Whisper decoding speed: our JAX pipeline against transformers' PyTorch `generate`, same weights.

For each size (random weights, real vocabulary and special-token ids) and batch
size, both sides decode exactly `--max_new_tokens` tokens (EOS suppressed) after
the forced prompt `<|startoftranscript|><|en|><|transcribe|><|notimestamps|>`,
starting from 30 s log-mel windows (encoder included). Reports tokens per second
and the real-time factor (compute seconds per second of audio), and writes a
markdown table.

    python -m experiments.bench_decode --flagfile=experiments/configs/bench_decode.flags
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
from absl import app, flags

from experiments import report

FLAGS = flags.FLAGS

# size -> (d_model, layers, heads), encoder and decoder alike (tiny ... small)
SIZES = {"tiny": (384, 4, 6), "base": (512, 6, 8), "small": (768, 12, 12)}


def whisper_special_ids() -> dict:
    """Special-token ids of the multilingual Whisper vocabulary, read from openai-whisper's tiktoken files."""
    from whisper.tokenizer import LANGUAGES, get_tokenizer

    tok = get_tokenizer(True, num_languages=99)
    lang_to_id = {f"<|{code}|>": tok.sot + 1 + i for i, code in enumerate(LANGUAGES)}
    return dict(sot=tok.sot, eot=tok.eot, transcribe=tok.transcribe, translate=tok.translate,
                no_timestamps=tok.no_timestamps, lang_to_id=lang_to_id)


def random_whisper(path: str, d_model: int, layers: int, heads: int, *, max_target_positions: int = 448,
                   init_std: float = 0.02, seed: int = 0):
    """Saves a random multilingual WhisperForConditionalGeneration (vocabulary 51865) with a Whisper
    generation config (language/task ids) to `path`; returns the torch model."""
    import torch
    import transformers

    ids = whisper_special_ids()
    torch.manual_seed(seed)
    cfg = transformers.WhisperConfig(
        vocab_size=51865, d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model, decoder_layers=layers, decoder_attention_heads=heads, decoder_ffn_dim=4 * d_model,
        max_target_positions=max_target_positions, pad_token_id=ids["eot"], bos_token_id=ids["eot"],
        eos_token_id=ids["eot"], decoder_start_token_id=ids["sot"], init_std=init_std)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    model.generation_config = transformers.GenerationConfig(
        decoder_start_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"], bos_token_id=ids["eot"],
        lang_to_id=ids["lang_to_id"], task_to_id={"transcribe": ids["transcribe"], "translate": ids["translate"]},
        no_timestamps_token_id=ids["no_timestamps"], is_multilingual=True, max_length=max_target_positions,
        suppress_tokens=[], begin_suppress_tokens=[220, ids["eot"]])
    model.save_pretrained(path)
    return model


def _best(fn, repeats):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def bench_size(size: str, batch_sizes, n: int, repeats: int, dtype: str) -> list[dict]:
    """Rows of the table for one model size."""
    import jax
    import jax.numpy as jnp
    import torch

    from asr.generate import DecodeOptions, generate
    from asr.whisper_decoder import WhisperDecoder
    from encoders.whisper import WhisperEncoder

    d, layers, heads = SIZES[size]
    ids = whisper_special_ids()
    prompt = [ids["sot"], ids["lang_to_id"]["<|en|>"], ids["transcribe"], ids["no_timestamps"]]
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    with tempfile.TemporaryDirectory() as path:
        ref = random_whisper(path, d, layers, heads)
        if dtype == "bfloat16":
            ref = ref.to(torch.bfloat16)
        enc = WhisperEncoder.from_pretrained(path, dtype=jdtype)
        dec = WhisperDecoder.from_pretrained(path, dtype=jdtype)
    opts = DecodeOptions(max_new_tokens=n, eos_token_id=ids["eot"], suppress_tokens=(ids["eot"],))
    rows = []
    for b in batch_sizes:
        mel = np.random.default_rng(0).standard_normal((b, 80, 3000)).astype(np.float32)

        def ours():
            out = generate(dec, enc(mel), np.array([prompt] * b), opts)
            return jax.block_until_ready(out.tokens)

        def theirs():
            with torch.no_grad():
                return ref.generate(torch.from_numpy(mel).to(ref.dtype), language="en", task="transcribe",
                                    max_new_tokens=n, suppress_tokens=[ids["eot"]], begin_suppress_tokens=[])

        t_ours, tokens = _best(ours, repeats)
        t_ref, ref_tokens = _best(theirs, repeats)
        assert tokens.shape == (b, n) and ref_tokens.shape[-1] >= n, (tokens.shape, ref_tokens.shape)
        same = float(np.mean(np.asarray(tokens) == ref_tokens.numpy()[:, -n:]))
        rows.append(dict(size=size, batch=b, ours_s=t_ours, ref_s=t_ref, tok_s_ours=b * n / t_ours,
                         tok_s_ref=b * n / t_ref, rtf_ours=t_ours / (30 * b), rtf_ref=t_ref / (30 * b),
                         speedup=t_ref / t_ours, same_tokens=same))
        print(rows[-1], flush=True)
    return rows


def define_flags():
    """Defines the binary's flags (only when run as a program, so importing this module defines none)."""
    flags.DEFINE_list("sizes", ["tiny", "base", "small"], "Whisper sizes (random weights).")
    flags.DEFINE_list("batch_sizes", ["1", "16"], "Batch sizes.")
    flags.DEFINE_integer("max_new_tokens", 32, "Tokens generated per window.")
    flags.DEFINE_integer("repeats", 1, "Timed repetitions after one warm-up (best kept).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both sides.")
    flags.DEFINE_string("output", "experiments/results/bench_decode.md", "Markdown table.")


def main(argv):
    del argv
    import torch

    rows = []
    for size in FLAGS.sizes:
        rows += bench_size(size, [int(b) for b in FLAGS.batch_sizes], FLAGS.max_new_tokens, FLAGS.repeats, FLAGS.dtype)
    machine = report.machine(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    lines = [
        "# Greedy Whisper decoding: asr (JAX) vs transformers PyTorch `generate`", "",
        f"Random-weight models with the real vocabulary; {FLAGS.max_new_tokens} tokens per 30 s window after the "
        f"4-token forced prompt (EOS suppressed on both sides), encoder included; {FLAGS.dtype}; best of "
        f"{FLAGS.repeats} after a warm-up. Machine: {machine}.", "",
        "| size | batch | ours s | PyTorch s | ours tok/s | PyTorch tok/s | ours RTF | PyTorch RTF | speed-up | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['size']} | {r['batch']} | {r['ours_s']:.2f} | {r['ref_s']:.2f} | {r['tok_s_ours']:.1f} | "
          f"{r['tok_s_ref']:.1f} | {r['rtf_ours']:.4f} | {r['rtf_ref']:.4f} | {r['speedup']:.2f}x | "
          f"{r['same_tokens']:.2f} |" for r in rows], "",
        "RTF: compute seconds per second of audio (lower is faster). `same tokens`: fraction of generated tokens "
        "equal between the two sides (random weights give near-tied logits, so float round-off can flip a few).",
    ]
    report.write_markdown(FLAGS.output, "\n".join(lines))


if __name__ == "__main__":
    define_flags()
    app.run(main)
