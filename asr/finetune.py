"""Whisper fine-tuning: teacher-forced cross-entropy over our NNX encoder and decoder, optax AdamW, orbax resume.

    model = WhisperSeq2Seq.from_pretrained(model_dir)
    result = finetune(model, tokenizer_dir=model_dir, examples=train.examples,
                      config=FinetuneConfig(trainable="attention", steps=200), checkpoint_dir="run/checkpoints")
    save_hf(result.model.state_dict(), template_dir=model_dir, out_dir="run/model")   # asr.merging.save_hf

- **Loss.** Each clip's label sequence is Whisper's forced prompt `<|startoftranscript|><|lang|><|transcribe|>
  <|notimestamps|>` (English-only checkpoints: `<|startoftranscript|><|notimestamps|>`), the transcript's tokens
  (with a leading space, as Whisper writes its output) and `<|endoftext|>`. The decoder reads the sequence minus its
  last token and is scored on the next token after the prompt: the prompt itself carries no loss. The loss is the
  mean cross-entropy over all scored tokens of the batch (transformers' `WhisperForConditionalGeneration` with the
  prompt's labels set to -100).
- **Optimiser.** optax AdamW with linear warm-up from 0 to `learning_rate` over `warmup_steps` and linear decay to 0
  at `steps`; no weight decay on biases and layer norms; gradients clipped to a global norm of `clip_norm` first.
- **Trainable sets** (`TRAINABLE_SETS`, by transformers parameter name): `all`, `attention` (q/k/v/out of every
  attention module, encoder and decoder), `decoder` (the decoder's layers and final norm; embeddings frozen),
  `frozen_encoder` (everything outside the encoder) and `decoder_attention`. The encoder's sinusoidal positions are
  never trained (transformers freezes them too).
- **Precision.** Master weights and optimiser state are float32; `compute_dtype="bfloat16"` runs the forward and
  backward passes in bfloat16 (logits and loss in float32).
- **Data.** A grain pipeline reads each step's global batch by index (epoch-wise permutations seeded by `seed`), so
  a resumed run reads exactly the batches the uninterrupted one would; with several JAX processes each decodes only
  its own rows. With a mesh the batch is split over `data` and parameters are placed by the logical-axis rules.
  With a frozen encoder, `cache_encoder_states=True` encodes every training clip once (host memory: clips x 1500 x
  d_model floats) and trains on the cached states.
- **Checkpoints.** orbax, every `checkpoint_every` steps and at the end (trainable parameters, AdamW state, step);
  a run restarts from the latest one and continues bit for bit, refusing a directory of another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from asr import training
from asr.whisper_decoder import WhisperDecoder
from asr.whisper_pipeline import WhisperTokens
from encoders import loading, runtime
from encoders.audio import HOP_LENGTH, SAMPLE_RATE, log_mel_spectrogram, pad_or_trim
from encoders.input_pipeline import Example, read_audio
from encoders.whisper import WhisperEncoder

_ATTENTION = re.compile(r"\.(self_attn|encoder_attn)\.(q|k|v|out)_proj\.")
_NEVER_TRAINED = ("model.encoder.embed_positions.weight",)

TRAINABLE_SETS = {
    "all": lambda name: True,
    "attention": lambda name: bool(_ATTENTION.search(name)),
    "decoder": lambda name: name.startswith(("model.decoder.layers.", "model.decoder.layer_norm.")),
    "frozen_encoder": lambda name: name.startswith("model.decoder."),
    "decoder_attention": lambda name: name.startswith("model.decoder.") and bool(_ATTENTION.search(name)),
}
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RUN_FILE = "finetune_run.json"  # the run description next to the checkpoints (`restore_checkpoint` reads it)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings (defaults: attention-only AdamW as in Whisper's paper: betas 0.9/0.98, eps 1e-6)."""

    trainable: str = "attention"
    steps: int = 200
    batch_size: int = 8
    learning_rate: float = 1e-5
    warmup_steps: int = 20
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    adam_b1: float = 0.9
    adam_b2: float = 0.98
    adam_eps: float = 1e-6
    compute_dtype: str = "float32"
    max_label_tokens: int | None = None  # label sequence length; default: the longest, rounded up to 8
    cache_encoder_states: bool = False
    checkpoint_every: int = 50
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the bad setting."""
        if self.trainable not in TRAINABLE_SETS:
            raise ValueError(f"unknown trainable set {self.trainable!r}; choose one of {sorted(TRAINABLE_SETS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        check_training_settings(self)


def check_training_settings(config) -> None:
    """Raises ValueError naming the bad setting among a training config's steps, batch_size, checkpoint_every,
    warmup_steps, learning_rate, clip_norm and weight_decay (shared by every trainer in `asr`)."""
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if not 0 <= config.warmup_steps < config.steps:
        raise ValueError(f"warmup_steps must be in [0, steps={config.steps}), got {config.warmup_steps}")
    if config.learning_rate <= 0 or config.clip_norm <= 0 or config.weight_decay < 0:
        raise ValueError("learning_rate and clip_norm must be positive and weight_decay non-negative")


class WhisperSeq2Seq(nnx.Module):
    """Our Whisper encoder and decoder as one module whose parameters carry transformers' names (`model.` prefix)."""

    def __init__(self, encoder: WhisperEncoder, decoder: WhisperDecoder):
        self.encoder, self.decoder = encoder, decoder

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, compute_dtype: str = "float32") -> "WhisperSeq2Seq":
        """Loads a Whisper checkpoint with float32 parameters computing in `compute_dtype`."""
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype!r}")
        model_dir = loading.resolve_model_dir(name_or_path)
        dtype = COMPUTE_DTYPES[compute_dtype]
        return cls(WhisperEncoder.from_pretrained(model_dir, dtype=dtype),
                   WhisperDecoder.from_pretrained(model_dir, dtype=dtype))

    @property
    def input_samples(self) -> int:
        """16 kHz samples of the encoder's input window (30 s for the released checkpoints)."""
        return self.encoder.num_frames * HOP_LENGTH

    def encode(self, mel):
        """Encoder states (B, S, D) of log-mel input (B, n_mels, frames), traceable (for gradients)."""
        return self.encoder.forward(mel, None, None)

    def logits(self, tokens, encoder_states):
        """Teacher-forced float32 logits (B, t, vocab) of decoder input tokens (B, t)."""
        return self.decoder(tokens, encoder_states)

    def state_dict(self) -> dict[str, np.ndarray]:
        """float32 parameters by transformers name, in torch layout (the output projection is tied to
        `model.decoder.embed_tokens.weight`, so transformers saves no `proj_out.weight`)."""
        return {parameter_name(path): loading.to_torch_layout(np.asarray(runtime.to_host(var.get_value()), np.float32),
                                                              path[-1] == "kernel")
                for path, var in nnx.iter_graph(self) if isinstance(var, nnx.Param)}


def parameter_name(path) -> str:
    """transformers name (`model.encoder...`, `model.decoder...`) of a `WhisperSeq2Seq` parameter path."""
    return "model." + loading.torch_name(tuple(getattr(k, "key", k) for k in path))


def trainable_names(model: WhisperSeq2Seq, trainable: str) -> list[str]:
    """Sorted transformers names of the parameters `trainable` selects."""
    if trainable not in TRAINABLE_SETS:
        raise ValueError(f"unknown trainable set {trainable!r}; choose one of {sorted(TRAINABLE_SETS)}")
    select = TRAINABLE_SETS[trainable]
    return sorted(name for name in (parameter_name(p) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param))
                  if select(name) and name not in _NEVER_TRAINED)


def split_trainable(model: WhisperSeq2Seq, names: Sequence[str]):
    """(graphdef, trainable leaves in a fixed order, their names, treedef, frozen state)."""
    wanted = set(names)
    graphdef, params, frozen = nnx.split(
        model, lambda path, v: isinstance(v, nnx.Param) and parameter_name(path) in wanted, ...)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaf_names = [parameter_name(tuple(k for k in path if hasattr(k, "key"))) for path, _ in paths_leaves]
    return graphdef, [leaf for _, leaf in paths_leaves], leaf_names, treedef, frozen


# ------------------------------------------------------------------------------------------------ labels


def label_sequence(tokens: WhisperTokens, tokenizer, text: str, language: str) -> list[int]:
    """Forced prompt + transcript tokens (leading space) + `<|endoftext|>`."""
    if language not in tokens.lang_to_id:
        raise ValueError(f"language {language!r} cannot be decoded by this checkpoint; it knows "
                         f"{sorted(tokens.lang_to_id)[:12]}...")
    return tokens.prompt(language) + tokenizer.encode(" " + text.strip(), add_special_tokens=False) + [tokens.eot]


def pad_labels(sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int], length: int, eot: int):
    """(B, length) int32 token rows padded with `eot` and (B, length) float32 masks: 1 where the token is predicted
    and scored (after the prompt, up to and including `<|endoftext|>`)."""
    tokens = np.full((len(sequences), length), eot, np.int32)
    mask = np.zeros((len(sequences), length), np.float32)
    for row, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
        tokens[row, : len(seq)] = seq
        mask[row, p: len(seq)] = 1.0
    return tokens, mask


def sequence_loss(model: WhisperSeq2Seq, tokens, mask, *, mel=None, encoder_states=None):
    """Mean next-token cross-entropy over the scored tokens: `tokens` (B, L) and `mask` (B, L) from `pad_labels`,
    with log-mel input (B, n_mels, frames) or precomputed encoder states (B, S, D). Returns (loss, scored tokens)."""
    states = model.encode(mel) if encoder_states is None else encoder_states
    logits = model.logits(tokens[:, :-1], states)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    weights = mask[:, 1:]
    count = weights.sum()
    return (ce * weights).sum() / jnp.maximum(count, 1.0), count


def loss_and_grads(model: WhisperSeq2Seq, names: Sequence[str], tokens, mask, *, mel=None, encoder_states=None):
    """(loss, {name: gradient in torch layout}) of `sequence_loss` w.r.t. the named parameters."""
    graphdef, leaves, leaf_names, treedef, frozen = split_trainable(model, names)

    def loss_fn(leaves, frozen, tokens, mask, mel, encoder_states):
        merged = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), frozen)
        return sequence_loss(merged, tokens, mask, mel=mel, encoder_states=encoder_states)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(leaves, frozen, jnp.asarray(tokens), jnp.asarray(mask), mel,
                                                       encoder_states)
    kernels = {parameter_name(p) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and p[-1] == "kernel"}
    return float(loss), {n: loading.to_torch_layout(np.asarray(g), n in kernels) for n, g in zip(leaf_names, grads)}


# ------------------------------------------------------------------------------------------------ optimiser


def learning_rate_schedule(config: FinetuneConfig):
    """Linear warm-up 0 -> learning_rate over warmup_steps, then linear decay to 0 at `steps`."""
    decay = optax.linear_schedule(config.learning_rate, 0.0, config.steps - config.warmup_steps)
    if config.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps), decay],
                                [config.warmup_steps])


def decays(name: str) -> bool:
    """Whether AdamW decays a parameter: weights and embeddings yes, biases and layer norms no."""
    return not (name.endswith(".bias") or "layer_norm." in name)


def make_optimizer(config: FinetuneConfig, names: Sequence[str]) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (decay masked by `decays`) on the schedule, over a list of leaves."""
    mask = [decays(n) for n in names]
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                    weight_decay=config.weight_decay, mask=lambda leaves: mask))


# ------------------------------------------------------------------------------------------------ data


@dataclasses.dataclass(frozen=True)
class LabelledClips:
    """Training clips with their label rows: `tokens`/`mask` (N, L) from `pad_labels`."""

    examples: tuple[Example, ...]
    tokens: np.ndarray
    mask: np.ndarray

    def fingerprint(self) -> str:
        """SHA-256 of the clips' ids and label rows (a resumed run must train on the same data)."""
        digest = hashlib.sha256("\n".join(e.id for e in self.examples).encode())
        digest.update(self.tokens.tobytes())
        return digest.hexdigest()


def label_clips(examples: Sequence[Example], tokens: WhisperTokens, tokenizer, *, input_samples: int,
                max_positions: int, length: int | None = None) -> LabelledClips:
    """Validates clips (a transcript, a decodable language, at most the encoder window) and builds their labels,
    padded to `length` (default: the longest rounded up to 8; at most the decoder's positions + 1)."""
    if not examples:
        raise ValueError("no training clips given")
    problems = [f"{e.id} (no transcript)" for e in examples if not e.text.strip()]
    problems += [f"{e.id} ({e.num_samples / SAMPLE_RATE:.2f} s > {input_samples / SAMPLE_RATE:.0f} s window)"
                 for e in examples if e.num_samples > input_samples]
    if problems:
        raise ValueError(f"{len(problems)} clip(s) cannot be trained on: {', '.join(problems[:8])}; give every clip a "
                         "transcript and split long clips into windows")
    sequences = [label_sequence(tokens, tokenizer, e.text, e.lang) for e in examples]
    longest = max(len(s) for s in sequences)
    length = min(-(-longest // 8) * 8, max_positions + 1) if length is None else length
    too_long = [f"{e.id} ({len(s)} tokens)" for e, s in zip(examples, sequences) if len(s) > length]
    if too_long or length > max_positions + 1:
        raise ValueError(f"label sequences longer than {min(length, max_positions + 1)} tokens (the decoder has "
                         f"{max_positions} positions): {', '.join(too_long[:8])}; shorten the transcripts or split "
                         "the clips")
    prompt = len(tokens.prompt(examples[0].lang))
    tokens_rows, mask = pad_labels(sequences, [prompt] * len(sequences), length, tokens.eot)
    return LabelledClips(tuple(examples), tokens_rows, mask)


def batch_schedule(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """(steps, batch_size) clip indices: clips in a fresh permutation per epoch (seeded by (seed, epoch)), read as
    one stream cut into batches, so step s's batch is a function of (n, batch_size, seed, s) alone."""
    epochs = -(-steps * batch_size // n)
    stream = np.concatenate([np.random.default_rng((seed, e)).permutation(n) for e in range(epochs)])
    return stream[: steps * batch_size].reshape(steps, batch_size)


def log_mel(model: WhisperSeq2Seq, audio: np.ndarray) -> np.ndarray:
    """(n_mels, frames) float32 log-mel of one clip padded to the encoder window."""
    return log_mel_spectrogram(pad_or_trim(audio, model.input_samples), model.encoder.config.num_mel_bins)


def batch_pipeline(clips: LabelledClips, schedule: np.ndarray, start: int, features):
    """grain iterator of this process's rows of batches `start`, `start+1`, ...: dicts {"inputs", "tokens",
    "mask"}; `features(example_index)` gives one clip's encoder input (log-mel or cached encoder states)."""
    local = runtime.process_block(schedule.shape[1])

    def read(step: int) -> dict:
        rows = schedule[step, local[0]: local[1]]
        return {"inputs": np.stack([features(i) for i in rows]), "tokens": clips.tokens[rows],
                "mask": clips.mask[rows]}

    dataset = grain.MapDataset.range(start, schedule.shape[0]).map(read)
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))


def cache_encoder_states(model: WhisperSeq2Seq, examples: Sequence[Example], batch_size: int, mesh=None,
                         desc: str = "encoding training clips") -> np.ndarray:
    """(N, S, D) float32 encoder states of every clip (frozen-encoder training and evaluation), in batches with a
    progress bar; with `mesh` each batch is split over `data` (every process gets all states)."""
    encode = nnx.jit(lambda m, mel: m.encode(mel).astype(jnp.float32))
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, unit="batch"):
        group = examples[i: i + batch_size]
        mel = np.stack([log_mel(model, read_audio(e)) for e in group] +
                       [np.zeros((model.encoder.config.num_mel_bins, model.encoder.num_frames), np.float32)]
                       * (batch_size - len(group)))
        mel = jnp.asarray(mel) if mesh is None else runtime.place(
            mel, runtime.logical_sharding(mesh, ("batch", None, None)))
        with runtime.mesh_context(mesh):
            out.append(runtime.to_host(encode(model, mel))[: len(group)])
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass
class FinetuneResult:
    """The fine-tuned model (trained parameters merged in) and `info`: losses and learning rates of the steps this
    call ran, compile / run seconds, XLA FLOPs per step, resumed-from step."""

    model: WhisperSeq2Seq
    info: dict


def finetune(model: WhisperSeq2Seq, examples: Sequence[Example], config: FinetuneConfig, *, tokenizer_dir: str,
             checkpoint_dir: str | None = None, mesh=None, progress: bool = True,
             model_name: str | None = None, encoder_states: np.ndarray | None = None) -> FinetuneResult:
    """Fine-tunes `model` (in place) on `examples` (transcripts in `Example.text`); see the module docstring.

    `tokenizer_dir`: the checkpoint's directory (generation_config.json and tokenizer files). `model_name`: what
    `model` was loaded from, recorded with the checkpoints (`restore_checkpoint` reloads it; default
    `tokenizer_dir`). `encoder_states`: the (N, S, D) states of `examples` already computed by this model's frozen
    encoder (with `cache_encoder_states`; default: computed here). On several processes every process passes the
    same examples and a mesh; each reads its rows of every global batch.
    """
    config.check()
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"training on {jax.process_count()} processes needs a mesh (pass mesh=)")
    from transformers import WhisperTokenizer

    tokens = WhisperTokens.from_model_dir(tokenizer_dir, model.decoder.config.vocab_size)
    tokenizer = WhisperTokenizer.from_pretrained(tokenizer_dir)
    clips = label_clips(examples, tokens, tokenizer, input_samples=model.input_samples,
                        max_positions=model.decoder.config.max_target_positions, length=config.max_label_tokens)
    names = trainable_names(model, config.trainable)
    if not names:
        raise ValueError(f"trainable set {config.trainable!r} selects no parameter of this model")
    if config.cache_encoder_states and any(n.startswith("model.encoder.") for n in names):
        raise ValueError(f"cache_encoder_states needs a frozen encoder, but trainable={config.trainable!r} trains it")
    if encoder_states is not None:
        if not config.cache_encoder_states:
            raise ValueError("encoder_states were given but cache_encoder_states is off; set it to train on them")
        expected = (len(examples), model.encoder.config.max_source_positions, model.encoder.config.d_model)
        if np.shape(encoder_states) != expected:
            raise ValueError(f"encoder_states must be (clips, positions, d_model) = {expected}, "
                             f"got {np.shape(encoder_states)}")
    global_batch = runtime.padded_size(config.batch_size, mesh)
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} does not split over {jax.process_count()} processes")
    if mesh is not None:
        runtime.shard_model(model, mesh)
    if config.cache_encoder_states:
        states = cache_encoder_states(model, clips.examples, global_batch, mesh) if encoder_states is None else encoder_states
        features = lambda i: states[i]  # noqa: E731
    else:
        features = lambda i: log_mel(model, read_audio(clips.examples[i]))  # noqa: E731

    graphdef, leaves, leaf_names, treedef, frozen = split_trainable(model, names)
    tx = make_optimizer(config, leaf_names)
    train = dict(params=leaves, opt_state=tx.init(leaves), step=jnp.asarray(0, jnp.int32))
    if mesh is not None:
        train["step"] = runtime.place(np.int32(0), runtime.logical_sharding(mesh, ()))
    schedule = batch_schedule(len(clips.examples), global_batch, config.steps, config.seed)
    manager = None
    if checkpoint_dir is not None:
        run = dict(model=model_name or tokenizer_dir, config=dataclasses.asdict(config), trainable=leaf_names,
                   data=clips.fingerprint(), batch=global_batch)
        manager, train = runtime.open_checkpoints(checkpoint_dir, config.checkpoint_every, train, run, mesh=mesh,
                                                  run_file=RUN_FILE)
    start_step = int(runtime.to_host(train["step"]))
    input_key = "encoder_states" if config.cache_encoder_states else "mel"

    def step_fn(train, frozen, batch):
        def loss_fn(leaves):
            merged = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves), frozen)
            return sequence_loss(merged, batch["tokens"], batch["mask"], **{input_key: batch["inputs"]})[0]

        loss, grads = jax.value_and_grad(loss_fn)(train["params"])
        updates, opt_state = tx.update(grads, train["opt_state"], train["params"])
        return (dict(params=optax.apply_updates(train["params"], updates), opt_state=opt_state, step=train["step"] + 1),
                loss, optax.tree.norm(grads))

    names_of = {"inputs": ("batch", None, None), "tokens": ("batch", "length"), "mask": ("batch", "length")}

    def device_batch(local: dict) -> dict:
        if mesh is None:
            return {k: jnp.asarray(v) for k, v in local.items()}
        return {k: runtime.global_rows(v, mesh, global_batch, names_of[k]) for k, v in local.items()}

    batches = batch_pipeline(clips, schedule, start_step, features)
    with runtime.mesh_context(mesh):
        train, info = training.run_steps(step_fn, train, (frozen,), lambda step: device_batch(next(batches)),
                                         start=start_step, steps=config.steps,
                                         learning_rate=learning_rate_schedule(config), manager=manager,
                                         desc=f"fine-tuning ({config.trainable})", progress=progress)
    info.update(resumed_from=start_step, trainable_parameters=int(sum(np.size(x) for x in leaves)))
    nnx.update(model, jax.tree.unflatten(treedef, train["params"]))
    info["steps"] = config.steps
    return FinetuneResult(model, info)


def restore_checkpoint(checkpoint_dir: str) -> tuple[WhisperSeq2Seq, str, int]:
    """(model with the latest checkpoint's parameters, the base model it was loaded from, that step) of a
    `finetune` checkpoint directory: what `experiments.export_hf` exports from a run, finished or killed."""
    config_path = os.path.join(checkpoint_dir, RUN_FILE)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{checkpoint_dir} has no {RUN_FILE}: not a fine-tuning checkpoint directory")
    with open(config_path) as f:
        run = json.load(f)
    config = FinetuneConfig(**run["config"])
    model = WhisperSeq2Seq.from_pretrained(run["model"], compute_dtype=config.compute_dtype)
    _, leaves, leaf_names, treedef, _ = split_trainable(model, run["trainable"])
    if leaf_names != run["trainable"]:
        raise ValueError(f"{run['model']} lacks parameters the run trained; it is not the run's base model")
    tx = make_optimizer(config, leaf_names)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                            dict(params=leaves, opt_state=tx.init(leaves), step=jnp.asarray(0, jnp.int32)))
    manager = ocp.CheckpointManager(os.path.abspath(checkpoint_dir))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{checkpoint_dir} holds no checkpoint yet")
    train = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    manager.close()
    nnx.update(model, jax.tree.unflatten(treedef, train["params"]))
    return model, run["model"], int(step)
