"""A simulated kill for the training loops' resume tests."""

from __future__ import annotations

import contextlib

import pytest


@contextlib.contextmanager
def killed_after(monkeypatch, module, steps: int):
    """Inside the block, `module._train_step` runs `steps` times, then the next call raises KeyboardInterrupt."""
    real_step = module._train_step
    calls = {"n": 0}

    def step_then_kill(*args):
        if calls["n"] == steps:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return real_step(*args)

    monkeypatch.setattr(module, "_train_step", step_then_kill)
    try:
        with pytest.raises(KeyboardInterrupt, match="simulated kill"):
            yield
    finally:
        monkeypatch.setattr(module, "_train_step", real_step)
    assert calls["n"] == steps, f"the run stopped after {calls['n']} steps, before the kill at step {steps + 1}"
