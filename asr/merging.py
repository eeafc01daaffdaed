"""Model merging of Whisper fine-tunes: pure functions over flat state dicts (transformers names -> float32 arrays).

    merged = merging.merge(base, [ft_a, ft_b], method="ties", density=0.2, lam=1.0, trim="global")

Task vector tau_m = theta_m - theta_base. Methods:
- `linear`: weighted average of the models (`weights`, default equal; normalised to sum 1).
- `task_arithmetic`: theta_base + lam * sum_m tau_m.
- `ties` (Yadav et al. 2023): trim each tau_m to its `density` fraction of largest magnitudes (over the whole model,
  `trim="global"`, as the paper; or per tensor, `trim="tensor"`, as mergekit), elect each entry's sign by the sign of
  sum_m trimmed tau_m, average the non-zero trimmed entries that agree with it (disjoint mean), theta_base + lam * that.
- `dare`: drop each entry of each tau_m with probability 1 - `density` (seeded), rescale the survivors by 1/density,
  then task arithmetic; `dare_ties`: the same drop and rescale, then TIES's sign election and disjoint mean.
- `hsa` (headwise selective attention; our reading of the method, every choice configurable): in every attention
  module (encoder self-attention, decoder self-attention, decoder cross-attention) head h owns rows h*d_h ... of the
  q, k, v weights and biases and the matching input columns of `out_proj.weight`. A head's saliency for model m is
  the L2 norm of tau_m over those slices; each model keeps its top `head_fraction` of heads, ranked over all modules
  (`select="global"`) or within each module (`select="layer"`); head slices become theta_base + lam * sum_m mask_m *
  tau_m. Everything else (out_proj bias, norms, MLPs, convs, embeddings) follows `non_attention`: "base",
  "task_arithmetic" or "linear".
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np
from safetensors.numpy import save

from encoders import loading, runtime

State = dict[str, np.ndarray]
METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_ties", "hsa")
NON_ATTENTION = ("base", "task_arithmetic", "linear")
_ATTENTION = re.compile(r"^(model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn))\."
                        r"(q_proj|k_proj|v_proj|out_proj)\.(weight|bias)$")


def check_states(base: Mapping[str, np.ndarray], finetuned: Sequence[Mapping[str, np.ndarray]]) -> None:
    """Refuses (ValueError) an empty list of models, or models whose names or shapes differ from the base's."""
    if not finetuned:
        raise ValueError("merging needs at least one fine-tuned model")
    for m, state in enumerate(finetuned):
        missing, extra = sorted(set(base) - set(state)), sorted(set(state) - set(base))
        if missing or extra:
            raise ValueError(f"model {m} does not match the base: missing {missing[:5]}, unexpected {extra[:5]}; "
                             "merge fine-tunes of the same architecture and size")
        wrong = [(k, np.shape(state[k]), np.shape(base[k])) for k in base if np.shape(state[k]) != np.shape(base[k])]
        if wrong:
            raise ValueError(f"model {m} has tensors of other shapes than the base (name, shape, base shape): "
                             f"{wrong[:5]}; merge fine-tunes of the same configuration")


def task_vectors(base: Mapping[str, np.ndarray], finetuned: Sequence[Mapping[str, np.ndarray]]) -> list[State]:
    """tau_m = theta_m - theta_base for every model, in float32."""
    check_states(base, finetuned)
    return [{k: np.asarray(s[k], np.float32) - np.asarray(base[k], np.float32) for k in base} for s in finetuned]


def _fraction(value: float, name: str, low_open: bool = False) -> float:
    value = float(value)
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value} must lie in {'(0, 1]' if low_open else '[0, 1]'}")
    return value


def _weights(weights, count: int) -> np.ndarray:
    w = np.full(count, 1.0 / count) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (count,) or not np.all(np.isfinite(w)) or w.sum() == 0:
        raise ValueError(f"weights must be {count} finite numbers with a non-zero sum, got {weights!r}")
    return w / w.sum()


def _top_mask(values: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the round(fraction * n) largest entries of the 1-D `values` (ties: lower index first)."""
    keep = int(round(fraction * values.size))
    mask = np.zeros(values.size, bool)
    if keep:
        order = np.lexsort((np.arange(values.size), -values))  # descending value, then index
        mask[order[:keep]] = True
    return mask


def _trim(tau: State, density: float, trim: str) -> State:
    """tau with all but its `density` fraction of largest magnitudes zeroed, over the model or per tensor."""
    names = sorted(tau)
    if trim == "tensor":
        return {k: np.where(_top_mask(np.abs(tau[k]).ravel(), density).reshape(tau[k].shape), tau[k], 0.0)
                for k in names}
    if trim != "global":
        raise ValueError(f"trim={trim!r}: use 'global' (the paper) or 'tensor' (mergekit)")
    flat = np.concatenate([np.abs(tau[k]).ravel() for k in names])
    mask, out, start = _top_mask(flat, density), {}, 0
    for k in names:
        size = tau[k].size
        out[k] = np.where(mask[start:start + size].reshape(tau[k].shape), tau[k], 0.0).astype(np.float32)
        start += size
    return out


def _disjoint_mean(taus: Sequence[State]) -> State:
    """TIES's sign election and disjoint mean of already sparsified task vectors."""
    out = {}
    for k in taus[0]:
        stack = np.stack([t[k] for t in taus])
        elected = np.sign(stack.sum(0))
        agree = (stack != 0) & (np.sign(stack) == elected)
        count = agree.sum(0)
        out[k] = np.where(count > 0, (stack * agree).sum(0) / np.maximum(count, 1), 0.0).astype(np.float32)
    return out


def _dare(tau: State, density: float, rng: np.random.Generator) -> State:
    """Random drop with keep probability `density` (tensors in name order), survivors rescaled by 1/density."""
    return {k: np.where(rng.random(tau[k].shape) < density, tau[k] / density, 0.0).astype(np.float32)
            for k in sorted(tau)}


def attention_modules(names, num_heads: Mapping[str, int]) -> dict[str, dict]:
    """{module prefix: {"side", "layer", "kind", "heads", "tensors"}} of every attention module among `names`;
    "tensors" are the head-sliced ones (q, k, v weights and biases, out_proj weight)."""
    modules: dict[str, dict] = {}
    for name in names:
        match = _ATTENTION.match(name)
        if match and not name.endswith("out_proj.bias"):  # the output bias belongs to no head
            prefix, side, layer, kind = match.group(1), match.group(2), int(match.group(3)), match.group(4)
            if side not in num_heads:
                raise ValueError(f"num_heads has no entry for the {side} (needed by {name}); pass "
                                 "num_heads={'encoder': H_enc, 'decoder': H_dec} or the model config")
            modules.setdefault(prefix, {"side": side, "layer": layer, "kind": kind, "heads": int(num_heads[side]),
                                        "tensors": []})["tensors"].append(name)
    return modules


def _head_slices(name: str, heads: int, shape) -> list:
    """Index of head h's slice of one attention tensor: rows of q/k/v weights and biases, columns of out_proj."""
    size = shape[1] if name.endswith("out_proj.weight") else shape[0]
    if size % heads:
        raise ValueError(f"{name} has {size} head rows/columns, not divisible by {heads} heads")
    d_h = size // heads
    if name.endswith("out_proj.weight"):
        return [(slice(None), slice(h * d_h, (h + 1) * d_h)) for h in range(heads)]
    return [slice(h * d_h, (h + 1) * d_h) for h in range(heads)]


def _resolve_heads(num_heads, config) -> dict[str, int]:
    if num_heads is not None:
        return dict(num_heads)
    if config is not None:
        return {"encoder": int(config["encoder_attention_heads"]), "decoder": int(config["decoder_attention_heads"])}
    raise ValueError("hsa needs num_heads={'encoder': H_enc, 'decoder': H_dec} or the model's config")


def head_saliency(base, finetuned, config=None, *, num_heads=None) -> dict[str, np.ndarray]:
    """{attention module prefix: (models, heads) L2 norms of each model's task vector over each head's slices}."""
    taus = task_vectors(base, finetuned)
    modules = attention_modules(base, _resolve_heads(num_heads, config))
    if not modules:
        raise ValueError("no attention tensors (model.{encoder,decoder}.layers.N.{self_attn,encoder_attn}."
                         "{q,k,v,out}_proj.*) in the state: is it a transformers Whisper state dict?")
    scores = {}
    for prefix, module in sorted(modules.items()):
        squares = np.zeros((len(taus), module["heads"]))
        for name in module["tensors"]:
            for h, index in enumerate(_head_slices(name, module["heads"], base[name].shape)):
                squares[:, h] += [float(np.sum(np.square(t[name][index], dtype=np.float64))) for t in taus]
        scores[prefix] = np.sqrt(squares)
    return scores


def _hsa(base, finetuned, taus, *, head_fraction, lam, select, non_attention, weights, heads) -> State:
    scores = head_saliency(base, finetuned, num_heads=heads)
    prefixes = sorted(scores)
    if select == "global":
        masks = []
        for m in range(len(taus)):
            flat = _top_mask(np.concatenate([scores[p][m] for p in prefixes]), head_fraction)
            masks.append(dict(zip(prefixes, np.split(flat, np.cumsum([scores[p].shape[1] for p in prefixes])[:-1]))))
    elif select == "layer":
        masks = [{p: _top_mask(scores[p][m], head_fraction) for p in prefixes} for m in range(len(taus))]
    else:
        raise ValueError(f"select={select!r}: use 'global' or 'layer'")
    if non_attention not in NON_ATTENTION:
        raise ValueError(f"non_attention={non_attention!r}: use one of {NON_ATTENTION}")
    modules = attention_modules(base, heads)
    head_tensors = {name: (prefix, m["heads"]) for prefix, m in modules.items() for name in m["tensors"]}
    w = _weights(weights, len(finetuned))
    out = {}
    for name in base:
        theta = np.asarray(base[name], np.float32)
        if name in head_tensors:
            prefix, count = head_tensors[name]
            delta = np.zeros_like(theta)
            for m, tau in enumerate(taus):
                for h, index in enumerate(_head_slices(name, count, theta.shape)):
                    if masks[m][prefix][h]:
                        delta[index] += tau[name][index]
            out[name] = theta + lam * delta
        elif non_attention == "base":
            out[name] = theta.copy()
        elif non_attention == "task_arithmetic":
            out[name] = theta + lam * sum(t[name] for t in taus)
        else:
            out[name] = sum(wm * np.asarray(s[name], np.float32) for wm, s in zip(w, finetuned)).astype(np.float32)
    return out


def merge(base: Mapping[str, np.ndarray], finetuned: Sequence[Mapping[str, np.ndarray]], method: str, *,
          lam: float = 1.0, weights=None, density: float = 0.2, trim: str = "global", seed: int = 0,
          head_fraction: float = 0.6, select: str = "global", non_attention: str = "base", num_heads=None,
          config: Mapping | None = None) -> State:
    """The merged state dict (float32, the base's names) of `finetuned` models of `base` by `method` (see the
    module docstring). Deterministic: the same inputs and `seed` give identical outputs."""
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; use one of {METHODS}")
    if not math.isfinite(float(lam)):
        raise ValueError(f"lam={lam} must be finite")
    taus = task_vectors(base, finetuned)
    theta = {k: np.asarray(v, np.float32) for k, v in base.items()}
    if method == "linear":
        w = _weights(weights, len(finetuned))
        return {k: sum(wm * np.asarray(s[k], np.float32) for wm, s in zip(w, finetuned)).astype(np.float32)
                for k in base}
    if method == "task_arithmetic":
        return {k: theta[k] + lam * sum(t[k] for t in taus) for k in base}
    if method == "hsa":
        return _hsa(base, finetuned, taus, head_fraction=_fraction(head_fraction, "head_fraction"), lam=lam,
                    select=select, non_attention=non_attention, weights=weights,
                    heads=_resolve_heads(num_heads, config))
    density = _fraction(density, "density", low_open=True)
    if method == "ties":
        combined = _disjoint_mean([_trim(t, density, trim) for t in taus])
        return {k: theta[k] + lam * combined[k] for k in base}
    rng = np.random.default_rng(seed)
    dropped = [_dare(t, density, rng) for t in taus]
    if method == "dare":
        return {k: theta[k] + lam * sum(t[k] for t in dropped) for k in base}
    combined = _disjoint_mean(dropped)
    return {k: theta[k] + lam * combined[k] for k in base}


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_state(directory: str) -> State:
    """The float32 state dict (transformers names) of a Hugging Face Whisper directory (or any name
    `encoders.loading` resolves: an installed offline model, a CTranslate2 directory, a Hub id)."""
    tensors = loading.load_state_dict(loading.resolve_model_dir(directory))
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def save_hf(state: Mapping[str, np.ndarray], template_dir: str, out_dir: str) -> str:
    """Writes `state` as `out_dir/model.safetensors` next to copies of `template_dir`'s other files (config,
    tokenizer, preprocessor, generation config), each written atomically; returns `out_dir`. The names must be
    the template's: a state of another architecture is refused."""

    check_states(load_state(template_dir), [state])
    for name in sorted(os.listdir(template_dir)):
        path = os.path.join(template_dir, name)
        if os.path.isfile(path) and name not in WEIGHT_FILES:
            with open(path, "rb") as f:
                runtime.atomic_write_bytes(os.path.join(out_dir, name), f.read())
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
    runtime.atomic_write_bytes(os.path.join(out_dir, "model.safetensors"), save(tensors, metadata={"format": "pt"}))
    return out_dir
