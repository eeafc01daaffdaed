"""The step loop shared by the trainers in `asr` (Whisper fine-tuning, the LLM-ASR projector).

The step is compiled once, ahead of time, on the first batch (compile seconds and XLA's FLOPs per step are recorded
apart from the running time); steps run from `start` to `steps` with a progress bar, each step's loss, gradient
norm and learning rate are logged, and an orbax manager (if given) saves after every step its interval allows and
at the last one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from encoders import runtime


def _train_step(executable, train, args, batch):
    """One optimisation step (module level, so tests can interrupt training between steps)."""
    return executable(train, *args, batch)


def run_steps(step_fn: Callable, train, args: tuple, batch_at: Callable[[int], dict], *, start: int, steps: int,
              learning_rate: Callable[[int], float], manager=None, desc: str = "training",
              progress: bool = True) -> tuple[dict, dict]:
    """(final train state, info) of `step_fn(train, *args, batch) -> (train, loss, grad_norm)` over the batches
    `batch_at(step)` of steps start..steps-1 (`train` is donated). info: losses, grad_norms, learning_rates,
    compile_seconds, run_seconds, flops_per_step (None when no step ran)."""
    info = dict(losses=[], grad_norms=[], learning_rates=[], compile_seconds=0.0, run_seconds=0.0,
                flops_per_step=None)
    executable = None
    bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress)
    for step in range(start, steps):
        batch = batch_at(step)
        if executable is None:
            began = time.perf_counter()
            executable = jax.jit(step_fn, donate_argnums=0).lower(train, *args, batch).compile()
            info["compile_seconds"] = time.perf_counter() - began
            info["flops_per_step"] = float((executable.cost_analysis() or {}).get("flops", float("nan")))
        began = time.perf_counter()
        train, loss, grad_norm = _train_step(executable, train, args, batch)
        loss = float(runtime.to_host(loss))
        info["run_seconds"] += time.perf_counter() - began
        info["losses"].append(loss)
        info["grad_norms"].append(float(runtime.to_host(grad_norm)))
        info["learning_rates"].append(float(learning_rate(step)))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")
        if manager is not None:
            manager.save(step + 1, args=ocp.args.StandardSave(train), force=step + 1 == steps)
    bar.close()
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return train, info
