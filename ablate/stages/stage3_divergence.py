"""Stage 3's usable-or-diverged rules: during training (``TrainLog``) and after it (weights, eval loss, probe).

    python -m pytest tests/test_usable.py -q -k "divergence_rules or loss_ceiling"

A run is ``completed`` only if its model is usable. It ends ``diverged``, naming why, at a non-finite loss or
grad norm, a grad norm spike, a logged loss over ``loss_ceiling`` (10x the first logged loss, kept within
[ln V, 3 ln V]), a grad norm of zero while the loss is above 1e-3 (saturated), or, after the last step,
non-finite weights, eval loss or probe.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger(__name__)
LOSS_RISE, UNIFORM_X = 10.0, 3.0  # loss_ceiling's factors
ZERO_GRAD, ZERO_GRAD_LOSS = 1e-10, 1e-3  # a grad norm this small while the loss is above this: saturated, not converged


class TrainLog(TrainerCallback):
    """Appends every log (loss, grad norm, learning rate, eval) to ``train_log.jsonl``; stops on divergence."""

    def __init__(self, path: Path, spike_factor: float, window: int, is_main: bool, history: list[dict] = (),
                 vocab_size: int = 0):
        self.path, self.spike_factor, self.window, self.is_main = path, spike_factor, window, is_main
        # A resumed run judges its next steps against the same recent grad norms and first loss as an uninterrupted one.
        self.grad_norms: list[float] = [e["grad_norm"] for e in history if "grad_norm" in e]
        first = next((e["loss"] for e in history if "loss" in e), None)
        self.first_loss, self.loss_ceiling = first, None if first is None else loss_ceiling(first, vocab_size)
        self.vocab_size = vocab_size
        self.diverged: str | None = None
        self.last_good_step = max((e["step"] for e in history if "loss" in e), default=0)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the last steps too, when logging_steps does not divide max_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if self.is_main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"step": state.global_step, "time": time.time(), **logs}) + "\n")
            log.info("step %d: %s", state.global_step, " ".join(
                f"{k}={v:.4g}" for k, v in logs.items() if isinstance(v, (int, float)) and k != "epoch"))
        loss, norm = logs.get("loss"), logs.get("grad_norm")
        if loss is not None and math.isfinite(loss) and self.loss_ceiling is None:
            self.first_loss, self.loss_ceiling = loss, loss_ceiling(loss, self.vocab_size)
        reason = self._divergence(loss, norm, state.global_step)
        if reason:
            self.diverged = reason
            control.should_training_stop = True
            control.should_save = False
        elif loss is not None:
            self.last_good_step = state.global_step
        return control

    def _divergence(self, loss, norm, step: int) -> str | None:
        """Why the logged ``loss`` and grad ``norm`` of ``step`` say the run diverged, or None (records the norm)."""
        if loss is not None and not math.isfinite(loss):
            return f"non-finite loss {loss} at step {step}"
        if loss is not None and loss > self.loss_ceiling:
            return (f"loss {loss:.4g} at step {step} rose over {self.loss_ceiling:.4g} ({LOSS_RISE:g}x "
                    f"the first logged loss {self.first_loss:.4g}, kept within ln(vocab) and {UNIFORM_X:g} ln(vocab))")
        unlearned = loss is not None and loss > ZERO_GRAD_LOSS
        if norm is not None and math.isfinite(norm) and norm <= ZERO_GRAD and unlearned:
            return (f"grad norm collapsed to {norm:.3g} at step {step} while the loss stays at "
                    f"{loss:.4g}: the model is saturated, not converged")
        if norm is None:
            return None
        if not math.isfinite(norm):
            return f"non-finite grad norm at step {step}"
        reason = None
        if len(self.grad_norms) >= 5:
            median = statistics.median(self.grad_norms[-self.window:])
            if median > 0 and norm > self.spike_factor * median:
                reason = (f"grad norm {norm:.3g} at step {step} is over "
                          f"{self.spike_factor:g}x its recent median {median:.3g}")
        self.grad_norms.append(norm)
        return reason


def loss_ceiling(first_loss: float, vocab_size: int) -> float:
    """The logged loss past which a run is diverged: ``LOSS_RISE`` x its first logged loss, kept within [ln V, 3 ln V].

    ln V is the loss of a uniform guess over the vocabulary: a loss under it is never called diverged (a
    finetune's first loss may be tiny), one over ``UNIFORM_X`` x it always is (worse than guessing, far).
    """
    uniform = math.log(vocab_size) if vocab_size > 1 else math.inf
    return max(uniform, min(LOSS_RISE * first_loss, UNIFORM_X * uniform))


def nonfinite_weights(model) -> str | None:
    """Why the trained weights are unusable (a NaN or inf anywhere), or None."""
    import torch

    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            return f"final weights are not finite ({name} holds NaN or inf)"
    return None


def unusable_result(eval_loss, probe_after: dict) -> str | None:
    """Why the finished run's measurements say the model is broken (a non-finite eval loss or probe), or None."""
    if eval_loss is not None and not math.isfinite(eval_loss):
        return f"eval loss is {eval_loss}"
    bad = [k for k in ("loss_mask", "loss_causal") if not math.isfinite(probe_after[k])]
    return f"probe after training is not finite ({', '.join(bad)})" if bad else None


def finite(value):
    """JSON has no NaN: a diverged run's non-finite losses are written as null (its reason says what they were)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
