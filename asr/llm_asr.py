"""Encoder–projector–LLM ASR (Tiny Audio, SLAM-ASR): frozen Whisper encoder states, a trained projector, a frozen
Llama-family LLM (`asr.llm`) that writes the transcript as its chat answer.

    projector = Projector(ProjectorConfig(encoder_dim=512, llm_dim=576), rngs=nnx.Rngs(0))
    prompt = ChatPrompt.from_tokenizer(tokenizer)          # "Transcribe: " + audio positions, in the chat template
    ids, mask = prompt.answer_tokens(tokenizer, transcripts)
    result = train_projector(lm, projector, prompt, states, ids, mask, ProjectorTrainConfig(steps=500),
                             checkpoint_dir="run/checkpoints")
    texts = transcribe(lm, result.projector, prompt, states, tokenizer)

- **Projectors** (`PROJECTORS`): `conv_mlp`, tiny-audio's exactly: Conv1d(E→E, kernel 3, stride 2, padding 1, no
  bias) → Linear(E→D, no bias) → GELU → Linear(D→D, no bias), weights N(0, 0.02) (E = 1280, D = 2048: 11,730,944
  parameters), 1500 encoder frames → 750 positions; `frame_stack`, SLAM-ASR's: k consecutive frames concatenated →
  Linear(kE→H) → ReLU → Linear(H→D). Either can end in an RMSNorm (`output_norm`, the later tiny-audio fix for
  outputs ~30x smaller than the token embeddings).
- **Splicing.** The user turn is `instruction` followed by the audio positions, rendered by the tokenizer's chat
  template around a placeholder string that is split out before tokenising: the prompt is the token ids before
  the placeholder, the projector outputs, then the ids after it (the opened assistant turn). No vocabulary row
  is added; the LLM's embedding table is untouched.
- **Frames.** Whisper encodes a fixed 30 s window; frames past a clip's real length (20 ms each) plus
  `margin_frames` carry only padding. `keep_frames` drops them before projecting, to one length for the whole
  data set (one compilation): what makes training on CPU feasible (a 4 s clip keeps ~13 % of the 1500 frames).
- **Loss.** Cross-entropy only on the assistant answer: the transcript tokens and the end-of-turn token.
- **Training** (`train_projector`): only the projector's parameters get gradients (the LLM is closed over, frozen);
  fp32 master weights; AdamW (tiny-audio: lr 3e-4, betas 0.9 / 0.95, weight decay 0.1) with linear warm-up and
  cosine decay, global-norm clipping; batches by step index from a seeded per-epoch permutation, split over
  `data` with a mesh; orbax checkpoints every `checkpoint_every` steps, resumed exactly (same batches, same
  optimiser state) after a kill; a progress bar.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from asr import training
from asr.finetune import batch_schedule, check_training_settings
from asr.llm import CausalLM, RMSNorm, chat_prompt, generate_from_embeds
from encoders import runtime
from encoders.layers import Conv1d, Dense

PROJECTORS = ("conv_mlp", "frame_stack")
PLACEHOLDER = "<|audio_placeholder|>"  # split out of the rendered template; never tokenised
FRAME_SECONDS = 0.02  # one Whisper encoder frame


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """Projector shape: `conv_mlp` (tiny-audio; hidden = llm_dim) or `frame_stack` (SLAM-ASR; `stack` frames,
    `hidden_dim` wide), with an optional output RMSNorm."""

    kind: str = "conv_mlp"
    encoder_dim: int = 512
    llm_dim: int = 576
    hidden_dim: int | None = None  # frame_stack: default 2048 (SLAM-ASR); conv_mlp: always llm_dim
    stack: int = 5
    output_norm: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def check(self) -> None:
        """Raises ValueError naming the bad setting."""
        if self.kind not in PROJECTORS:
            raise ValueError(f"unknown projector {self.kind!r}; choose one of {PROJECTORS}")
        if min(self.encoder_dim, self.llm_dim, self.stack) < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
            raise ValueError("projector widths and stack must be positive")

    def positions(self, frames: int) -> int:
        """LLM positions the projector makes of `frames` encoder frames."""
        if self.kind == "conv_mlp":
            return (frames + 2 - 3) // 2 + 1
        return frames // self.stack


class Projector(nnx.Module):
    """Encoder states (B, frames, E) -> LLM input embeddings (B, positions, D)."""

    def __init__(self, config: ProjectorConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        config.check()
        self.config = config
        normal = lambda shape: config.init_std * jax.random.normal(rngs.params(), shape)
        if config.kind == "conv_mlp":
            self.conv = Conv1d(config.encoder_dim, config.encoder_dim, 3, stride=2, padding=1, use_bias=False,
                               rngs=rngs, dtype=dtype)
            self.conv.kernel.set_value(normal(self.conv.kernel.get_value().shape))
            first_in, hidden = config.encoder_dim, config.llm_dim
        else:
            self.conv = None
            first_in, hidden = config.encoder_dim * config.stack, config.hidden_dim or 2048
        self.linear_1 = Dense(first_in, hidden, ("embed", "mlp"), rngs=rngs, use_bias=False, dtype=dtype)
        self.linear_2 = Dense(hidden, config.llm_dim, ("mlp", "embed"), rngs=rngs, use_bias=False, dtype=dtype)
        for layer in (self.linear_1, self.linear_2):
            layer.kernel.set_value(normal(layer.kernel.get_value().shape))
        self.norm = RMSNorm(config.llm_dim, config.norm_eps, dtype=dtype) if config.output_norm else None

    def __call__(self, states):
        cfg = self.config
        x = states
        if self.conv is not None:
            x = jax.nn.gelu(self.linear_1(self.conv(x)), approximate=False)
        else:
            b, t, e = x.shape
            t = t // cfg.stack * cfg.stack
            x = jax.nn.relu(self.linear_1(x[:, :t].reshape(b, t // cfg.stack, cfg.stack * e)))
        x = self.linear_2(x)
        return x if self.norm is None else self.norm(x)


def parameter_count(module: nnx.Module) -> int:
    """Number of parameters of a module."""
    return int(sum(np.size(v.get_value()) for _, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)))


def keep_frames(num_samples: Sequence[int], margin_frames: int = 8, multiple: int = 16, limit: int = 1500) -> int:
    """Encoder frames to keep for clips of these lengths (16 kHz samples): the longest clip's frames plus the
    margin, rounded up to `multiple`, at most `limit` (Whisper's 1500)."""
    frames = math.ceil(max(num_samples) / (16000 * FRAME_SECONDS)) + margin_frames
    return min(limit, -(-frames // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class ChatPrompt:
    """Token ids around the audio positions in the chat template, and the end-of-turn id that ends an answer."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    end_of_turn: int

    @classmethod
    def from_tokenizer(cls, tokenizer, instruction: str = "Transcribe: ",
                       end_of_turn: str | None = None) -> "ChatPrompt":
        """Renders one user turn `instruction` + audio with the chat template (assistant turn opened) and
        tokenises the text on either side of the audio; `end_of_turn` defaults to the tokenizer's EOS token."""
        text = chat_prompt(tokenizer, instruction + PLACEHOLDER)
        if text.count(PLACEHOLDER) != 1:
            raise ValueError("the chat template did not keep the user text verbatim; cannot place the audio")
        before, after = text.split(PLACEHOLDER)
        eot = tokenizer.convert_tokens_to_ids(end_of_turn) if end_of_turn else tokenizer.eos_token_id
        if eot is None or (end_of_turn and tokenizer.convert_ids_to_tokens(eot) != end_of_turn):
            raise ValueError(f"the tokenizer has no end-of-turn token {end_of_turn or '(EOS)'}; pass end_of_turn= "
                             "one of its special tokens")
        encode = lambda s: tuple(tokenizer(s, add_special_tokens=False)["input_ids"])
        return cls(encode(before), encode(after), int(eot))

    def answer_tokens(self, tokenizer, texts: Sequence[str], length: int | None = None):
        """(ids (B, length), mask (B, length)): each transcript's tokens + end-of-turn, right-padded with
        end-of-turn; mask 1 on the scored tokens. `length` defaults to the longest, rounded up to 8."""
        rows = [list(tokenizer(t.strip(), add_special_tokens=False)["input_ids"]) + [self.end_of_turn]
                for t in texts]
        longest = max(len(r) for r in rows)
        length = -(-longest // 8) * 8 if length is None else length
        if longest > length:
            raise ValueError(f"a transcript has {longest - 1} tokens, more than the {length - 1} allowed")
        ids = np.full((len(rows), length), self.end_of_turn, np.int32)
        mask = np.zeros((len(rows), length), np.float32)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1.0
        return ids, mask


def spliced_embeddings(lm: CausalLM, projector: Projector, prompt: ChatPrompt, states, answer_ids=None):
    """Input embeddings (B, P + A + S [+ L], D): prompt prefix, projected audio, suffix, then (teacher forcing) the
    answer tokens."""
    b = states.shape[0]
    audio = projector(states).astype(lm.dtype)
    pieces = [lm.embed(jnp.broadcast_to(jnp.asarray(prompt.prefix, jnp.int32), (b, len(prompt.prefix)))), audio,
              lm.embed(jnp.broadcast_to(jnp.asarray(prompt.suffix, jnp.int32), (b, len(prompt.suffix))))]
    if answer_ids is not None:
        pieces.append(lm.embed(jnp.asarray(answer_ids, jnp.int32)))
    return jnp.concatenate(pieces, axis=1)


def answer_loss(lm: CausalLM, projector: Projector, prompt: ChatPrompt, states, answer_ids, answer_mask):
    """Mean cross-entropy over the scored answer tokens (transcript + end-of-turn); the prompt and the audio
    positions carry no loss. The first answer token is predicted from the last prompt position."""
    embeds = spliced_embeddings(lm, projector, prompt, states, answer_ids)
    length = answer_ids.shape[1]
    logits = lm.forward_embeds(embeds[:, :-1])[:, -length:]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, answer_ids)
    return (ce * answer_mask).sum() / jnp.maximum(answer_mask.sum(), 1.0)


def transcribe(lm: CausalLM, projector: Projector, prompt: ChatPrompt, states, tokenizer, *,
               max_new_tokens: int = 96) -> list[str]:
    """Greedy transcripts of encoder states (B, frames, E) (already cut to the kept frames)."""
    embeds = spliced_embeddings(lm, projector, prompt, jnp.asarray(states))
    tokens = generate_from_embeds(lm, embeds, max_new_tokens=max_new_tokens, eos_token_id=prompt.end_of_turn,
                                  pad_token_id=prompt.end_of_turn)
    out = []
    for row in tokens:
        ends = np.flatnonzero(row == prompt.end_of_turn)
        out.append(tokenizer.decode(row[: ends[0] if len(ends) else len(row)], skip_special_tokens=True).strip())
    return out


# ------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class ProjectorTrainConfig:
    """Projector training settings (defaults: tiny-audio's optimiser; warm-up shortened for short runs)."""

    steps: int = 1000
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    clip_norm: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0

    def check(self) -> None:
        """Raises ValueError naming the bad setting."""
        check_training_settings(self)


def learning_rate_schedule(config: ProjectorTrainConfig):
    """Linear warm-up 0 -> learning_rate, then cosine decay to 0 at `steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, config.warmup_steps, config.steps, 0.0)


def make_optimizer(config: ProjectorTrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW on the schedule (every projector matrix decays; the norm does not)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(optax.clip_by_global_norm(config.clip_norm),
                       optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                                   weight_decay=config.weight_decay, mask=decay_mask))


@dataclasses.dataclass
class ProjectorTrainResult:
    """The trained projector and `info`: per-step losses, learning rates, compile / run seconds, XLA FLOPs."""

    projector: Projector
    info: dict


def train_projector(lm: CausalLM, projector: Projector, prompt: ChatPrompt, states: np.ndarray,
                    answer_ids: np.ndarray, answer_mask: np.ndarray, config: ProjectorTrainConfig, *,
                    checkpoint_dir: str | None = None, run: dict | None = None, mesh=None,
                    progress: bool = True) -> ProjectorTrainResult:
    """Trains `projector` (in place) on encoder states (N, frames, E) and answers (N, L) from `answer_tokens`;
    the LLM stays frozen. `run` (JSON) describes the data and models for the checkpoint directory's run check."""
    config.check()
    if not (len(states) == len(answer_ids) == len(answer_mask)) or len(states) == 0:
        raise ValueError(f"states ({len(states)}), answer ids ({len(answer_ids)}) and masks ({len(answer_mask)}) "
                         "must be non-empty and have one row per clip")
    if states.ndim != 3 or states.shape[-1] != projector.config.encoder_dim:
        raise ValueError(f"states must be (clips, frames, {projector.config.encoder_dim}), got {states.shape}")
    if mesh is None and jax.process_count() > 1:
        raise ValueError(f"training on {jax.process_count()} processes needs a mesh (pass mesh=)")
    global_batch = runtime.padded_size(config.batch_size, mesh)
    if mesh is not None:
        runtime.shard_model(lm, mesh)
        runtime.shard_model(projector, mesh)
    graphdef, params = nnx.split(projector, nnx.Param)
    lm_graphdef, lm_state = nnx.split(lm)
    tx = make_optimizer(config)
    train = dict(params=params, opt_state=tx.init(params), step=jnp.asarray(0, jnp.int32))
    if mesh is not None:
        train["step"] = runtime.place(np.int32(0), runtime.logical_sharding(mesh, ()))
    schedule = batch_schedule(len(states), global_batch, config.steps, config.seed)
    manager = None
    if checkpoint_dir is not None:
        description = dict(run or {}, config=dataclasses.asdict(config), projector=dataclasses.asdict(projector.config),
                           batch=global_batch, clips=int(len(states)))
        manager, train = runtime.open_checkpoints(checkpoint_dir, config.checkpoint_every, train, description,
                                                  mesh=mesh, run_file="projector_run.json")
    start = int(runtime.to_host(train["step"]))

    def step_fn(train, lm_state, batch):
        def loss_fn(params):
            return answer_loss(nnx.merge(lm_graphdef, lm_state), nnx.merge(graphdef, params), prompt,
                               batch["states"], batch["ids"], batch["mask"])

        loss, grads = jax.value_and_grad(loss_fn)(train["params"])
        updates, opt_state = tx.update(grads, train["opt_state"], train["params"])
        return (dict(params=optax.apply_updates(train["params"], updates), opt_state=opt_state,
                     step=train["step"] + 1), loss, optax.tree.norm(grads))

    names = {"states": ("batch", None, None), "ids": ("batch", "length"), "mask": ("batch", "length")}
    local = runtime.process_block(global_batch)

    def device_batch(step: int) -> dict:
        rows = schedule[step, local[0]: local[1]]
        host = {"states": np.asarray(states[rows], np.float32), "ids": answer_ids[rows], "mask": answer_mask[rows]}
        if mesh is None:
            return {k: jnp.asarray(v) for k, v in host.items()}
        return {k: runtime.global_rows(v, mesh, global_batch, names[k]) for k, v in host.items()}

    with runtime.mesh_context(mesh):
        train, info = training.run_steps(step_fn, train, (lm_state,), device_batch, start=start, steps=config.steps,
                                         learning_rate=learning_rate_schedule(config), manager=manager,
                                         desc="training the projector", progress=progress)
    info.update(resumed_from=start, trainable_parameters=parameter_count(projector))
    nnx.update(projector, train["params"])
    info["steps"] = config.steps
    return ProjectorTrainResult(projector, info)
