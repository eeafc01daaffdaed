"""Benchmark: encoders (JAX/Flax) against transformers (PyTorch), random weights, batch 8.

Each (model, framework) pair runs in its own subprocess so that peak memory
(ru_maxrss of that process: weights + activations + framework runtime) is not
shared. Timing separates the first call (compilation / warm-up) from the mean
of `--iters` steady-state calls. Frameworks alternate over `--repeats` (>= 3)
rounds, and each speed-up is a same-round ratio, reported as the median over
rounds with its spread. Writes a markdown table to `--results_md`.

  python -m experiments.bench.bench_encoders
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import app, flags

from experiments.lib import report, runtime_flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["whisper_small", "xlsr_300m"], "Models to benchmark.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "Frameworks to benchmark.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_float("xlsr_seconds", 10.0, "Seconds of audio per XLS-R example (Whisper always takes 30 s).")
flags.DEFINE_integer("iters", 2, "Steady-state iterations timed after the first call.")
flags.DEFINE_integer("repeats", 3, "Rounds of fresh processes, frameworks alternating; speed-ups are same-round ratios.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_string("results_md", "experiments/results/bench_encoders.md", "Markdown output path.")
flags.DEFINE_string("worker", None, "Internal: run one 'model:framework' measurement and print JSON.")

WHISPER_SMALL = dict(num_mel_bins=80, d_model=768, encoder_layers=12, encoder_attention_heads=12,
                     encoder_ffn_dim=3072)
XLSR_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                 conv_dim=(512,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                 conv_bias=True, feat_extract_norm="layer", do_stable_layer_norm=True)


def audio_seconds(model: str, batch: int, xlsr_seconds: float) -> float:
    """Audio seconds processed per forward call."""
    return batch * (30.0 if model == "whisper_small" else xlsr_seconds)


def make_input(model: str, batch: int, xlsr_seconds: float):
    """Random float32 input: log-mel (B, 80, 3000) for Whisper, audio (B, samples) for XLS-R."""
    import numpy as np

    rng = np.random.default_rng(0)
    if model == "whisper_small":
        return rng.standard_normal((batch, 80, 3000), dtype=np.float32)
    return rng.standard_normal((batch, int(16000 * xlsr_seconds)), dtype=np.float32)


def build_jax(model: str, dtype: str):
    """Random-weight encoders model and a blocking forward function."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from encoders import wav2vec2, whisper

    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if model == "whisper_small":
        enc = whisper.WhisperEncoder(whisper.WhisperConfig(**WHISPER_SMALL), rngs=nnx.Rngs(0), dtype=jdtype,
                                     param_dtype=jdtype)
    else:
        enc = wav2vec2.Wav2Vec2Encoder(wav2vec2.Wav2Vec2Config(**XLSR_300M), rngs=nnx.Rngs(0), dtype=jdtype,
                                       param_dtype=jdtype)
    return lambda x: jax.block_until_ready(enc(x))


def build_torch(model: str, dtype: str):
    """Random-weight transformers model (SDPA attention) and a forward function."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    if model == "whisper_small":
        cfg = transformers.WhisperConfig(**WHISPER_SMALL, attn_implementation="sdpa")
        net = transformers.models.whisper.modeling_whisper.WhisperEncoder(cfg)
    else:
        cfg = transformers.Wav2Vec2Config(**XLSR_300M, attn_implementation="sdpa")
        net = transformers.Wav2Vec2Model(cfg)
    net = net.eval().to(tdtype)

    def forward(x):
        with torch.inference_mode():
            return net(torch.from_numpy(x).to(tdtype)).last_hidden_state

    return forward


def run_worker(spec: str) -> dict:
    """Times one model/framework pair in this process and returns the measurements."""
    model, framework = spec.split(":")
    x = make_input(model, FLAGS.batch, FLAGS.xlsr_seconds)
    forward = (build_jax if framework == "jax" else build_torch)(model, FLAGS.dtype)
    t0 = time.perf_counter()
    forward(x)
    first = time.perf_counter() - t0
    times = []
    for _ in range(FLAGS.iters):
        t0 = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t0)
    steady = sum(times) / len(times)
    return dict(model=model, framework=framework, first_s=first, steady_s=steady,
                throughput=audio_seconds(model, FLAGS.batch, FLAGS.xlsr_seconds) / steady,
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def run_subprocess(model: str, framework: str) -> dict:
    """Runs one measurement in a fresh Python process and returns its result."""
    cmd = [sys.executable, "-m", "experiments.bench.bench_encoders", f"--worker={model}:{framework}",
           f"--batch={FLAGS.batch}", f"--xlsr_seconds={FLAGS.xlsr_seconds}", f"--iters={FLAGS.iters}",
           f"--dtype={FLAGS.dtype}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{model}:{framework} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[7:])


def main(argv):
    """Runs the workers (or one worker with --worker) and writes the markdown table."""
    runtime_flags.init()
    del argv
    if FLAGS.worker:
        print("RESULT " + json.dumps(run_worker(FLAGS.worker)))
        return
    report.run_facts()  # the machine line of the stamp, GEMM rate measured before the work starts
    if FLAGS.repeats < 3 or len(FLAGS.frameworks) < 1:
        raise app.UsageError("--repeats must be at least 3 (speed-ups are medians over rounds, with the spread)")
    rows, log = [], []
    for round_ in range(FLAGS.repeats):
        for model in FLAGS.models:
            # the sides alternate: each framework goes first in every other round
            order = FLAGS.frameworks if round_ % 2 == 0 else FLAGS.frameworks[::-1]
            for framework in order:
                row = dict(run_subprocess(model, framework), round=round_)
                rows.append(row)
                print(f"round {round_}: {row}", flush=True)
                log.append(f"| {round_} | {model} | {framework} | {row['first_s']:.1f} | {row['steady_s']:.2f} | "
                           f"{row['peak_rss_gib']:.2f} |")
    import torch

    lines = [
        "# Encoder benchmark: encoders (JAX/Flax NNX) vs transformers (PyTorch)", "",
        f"Machine: {report.machine(f'torch {torch.__version__}')}.", "",
        f"Random weights (this benchmark builds its models from configs; it loads no checkpoint), batch "
        f"{FLAGS.batch}, {FLAGS.dtype}. Whisper-small-sized encoder (d 768, 12 layers, "
        "12 heads, ffn 3072) on 30 s log-mel input (80 x 3000); XLS-R-300M-sized encoder (hidden 1024, "
        "24 layers, 16 heads, ffn 4096, 7 conv layers of 512 channels, layer-norm feature encoder with conv bias, "
        f"stable layer norm) on {FLAGS.xlsr_seconds:g} s of audio per example. PyTorch uses SDPA attention, "
        "`torch.inference_mode` and all cores.", "",
        f"First call = compilation (JAX `jit`) or warm-up (PyTorch) plus one run; steady = mean of "
        f"{FLAGS.iters} further calls. {FLAGS.repeats} rounds of fresh processes; within a round each model runs "
        "under every framework, the order alternating round by round. Every speed-up is the ratio of the two "
        "frameworks' steady times in the same round; the table gives the median over rounds and the min-max. "
        "Peak RSS = `ru_maxrss` of a separate process per row (weights, activations and framework runtime).", "",
        "| model | framework | first call s, median (min-max) | steady s/batch, median (min-max) | "
        "throughput (audio s / s, median) | peak RSS GiB (max) | speed-up vs torch, per round: median (min-max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in FLAGS.models:
        for framework in FLAGS.frameworks:
            mine = [r for r in rows if r["model"] == model and r["framework"] == framework]
            torch_of = {r["round"]: r["steady_s"] for r in rows if r["model"] == model and r["framework"] == "torch"}
            ratios = [torch_of[r["round"]] / r["steady_s"] for r in mine if r["round"] in torch_of]
            steady = [r["steady_s"] for r in mine]
            lines.append(f"| {model} | {framework} | {report.median_range([r['first_s'] for r in mine])} | {report.median_range(steady)} | "
                         f"{audio_seconds(model, FLAGS.batch, FLAGS.xlsr_seconds) / statistics.median(steady):.1f} | "
                         f"{max(r['peak_rss_gib'] for r in mine):.2f} | "
                         f"{report.median_range(ratios) + 'x' if ratios and framework != 'torch' else '1 (reference)' if ratios else 'n/a'} |")
    lines += ["", "Every round, in the order run:", "", "| round | model | framework | first call (s) | steady (s/batch) | "
              "peak RSS (GiB) |", "|---|---|---|---|---|---|", *log]
    report.write_markdown(FLAGS.results_md, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
