"""Greedy decoding speed of our Llama port (`asr.llm`) against transformers (PyTorch) on the real SmolLM2-135M-Instruct.

Both load the same GGUF file (`--llm`; ours dequantises with `asr.gguf_io`, transformers with its own GGUF loader)
in float32 and decode the same chat prompts (`PROMPTS`, left-padded in batches) greedily for at most
`--max_new_tokens`, stopping at `<|im_end|>`. Per batch size: a warm-up call per system (ours: its first call
compiles, reported apart), then `--rounds` rounds in alternating order. Tokens/s counts the generated tokens up to
and including each row's end of turn; speed-ups are per round (same machine state), median with the spread.
Token ids are compared row by row.

    python -m experiments.bench.bench_llm_decode --flagfile=experiments/configs/bench_llm_decode.flags
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from asr import gguf_io, llm
from experiments.lib import report, runtime_flags

_LLM = flags.DEFINE_string("llm", "smollm2-135m-instruct-q4_1", "Offline GGUF name or .gguf path.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 48, "Generated tokens at most per row.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (at least 3).")
_RESULTS_MD = flags.DEFINE_string("results_md", "experiments/results/bench_llm_decode.md", "Results table.")

PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "Name three colours.",
           "Explain what a verb is.", "Give me a tip for learning a language.", "What is two plus three?",
           "Describe a cat in a few words.", "Why is the sky blue?"]


def generated(rows: np.ndarray, end: int) -> list[list[int]]:
    """Each row's generated ids up to and including the first end-of-turn id."""
    out = []
    for row in rows:
        hits = np.flatnonzero(row == end)
        out.append(row[: hits[0] + 1 if len(hits) else len(row)].tolist())
    return out


def main(argv):
    runtime_flags.init()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _ROUNDS.value < 3:
        raise app.UsageError("--rounds must be at least 3")
    report.run_facts()
    import torch
    from transformers import AutoModelForCausalLM

    path = gguf_io.resolve_gguf(_LLM.value)
    tokenizer = llm.load_tokenizer(_LLM.value)
    tokenizer.padding_side = "left"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    ours = llm.CausalLM.from_pretrained(path)
    directory, name = os.path.split(path)
    theirs = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()
    lines = ["# Greedy decoding: our Llama port (JAX) vs transformers (PyTorch), SmolLM2-135M-Instruct", "",
             f"`{_LLM.value}` dequantised to float32 by each side; chat prompts, at most {_MAX_NEW.value} new "
             f"tokens, stop at `<|im_end|>`; {_ROUNDS.value} rounds, alternating order; torch threads "
             f"{torch.get_num_threads()}.", "",
             "| batch | ours compile + first call s | ours tokens/s | transformers tokens/s | speed-up (ours / "
             "transformers) | rows with equal tokens |", "|---|---|---|---|---|---|"]
    for batch in [int(b) for b in _BATCHES.value]:
        texts = [llm.chat_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        enc = tokenizer(texts, return_tensors="np", padding=True, add_special_tokens=False)
        ids, mask = enc["input_ids"], enc["attention_mask"]

        def run_ours():
            return llm.generate(ours, ids, _MAX_NEW.value, attention_mask=mask, eos_token_id=end,
                                pad_token_id=pad)[:, ids.shape[1]:]

        def run_theirs():
            with torch.no_grad():
                out = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                      max_new_tokens=_MAX_NEW.value, eos_token_id=end, pad_token_id=pad)
            return out.numpy()[:, ids.shape[1]:]

        start = time.perf_counter()
        first = run_ours()
        first_call = time.perf_counter() - start
        reference = run_theirs()
        same = sum(a == b for a, b in zip(generated(first, end), generated(reference, end)))
        rates = {"ours": [], "theirs": []}
        for round_ in range(_ROUNDS.value):
            for side in (("ours", "theirs") if round_ % 2 == 0 else ("theirs", "ours")):
                fn = run_ours if side == "ours" else run_theirs
                start = time.perf_counter()
                out = fn()
                seconds = time.perf_counter() - start
                rates[side].append(sum(len(r) for r in generated(out, end)) / seconds)
        speedups = [a / b for a, b in zip(rates["ours"], rates["theirs"])]
        lines.append(f"| {batch} | {first_call:.1f} | {report.median_range(rates['ours'], 1)} | "
                     f"{report.median_range(rates['theirs'], 1)} | {report.median_range(speedups)} | "
                     f"{same} / {batch} |")
        print(lines[-1], flush=True)
    report.write_markdown(_RESULTS_MD.value, "\n".join(lines + [""]))


if __name__ == "__main__":
    app.run(main)
