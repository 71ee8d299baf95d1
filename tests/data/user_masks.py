"""Mask functions for tests/test_user_masks.py, in the form `--mask FILE.py:NAME` loads (docs/masks.md)."""
import torch


def prefill(prompt_lens, segment_ids):
    """prefill_bidir, restated: the prompt sees itself; the rest is causal."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        p = prompt_lens[batch_idx]
        return (kv_idx <= q_idx) | ((q_idx < p) & (kv_idx < p))
    return inner


def segments(prompt_lens, segment_ids):
    """segment_bidir, restated."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        p = prompt_lens[batch_idx]
        same = segment_ids[batch_idx, q_idx] == segment_ids[batch_idx, kv_idx]
        return (kv_idx <= q_idx) | ((q_idx < p) & (kv_idx < p) & same)
    return inner


def causal(prompt_lens, segment_ids):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= q_idx
    return inner


def full(prompt_lens, segment_ids):
    """full_bidir, restated: every token sees every token (leaks)."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx >= 0) & (q_idx >= 0)
    return inner


def prompt_window(prompt_lens, segment_ids):
    """Prompt tokens see prompt tokens within 2 positions either way; the rest causal."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        p = prompt_lens[batch_idx]
        return (kv_idx <= q_idx) | ((q_idx < p) & (kv_idx < p) & ((q_idx - kv_idx).abs() <= 2))
    return inner


def next_token(prompt_lens, segment_ids):
    """Every token also sees the next one: a scored token sees itself (leaks)."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx <= q_idx + 1
    return inner


def response_skips_first(prompt_lens, segment_ids):
    """Causal, but tokens after the prompt do not see the first token: not causal after the prompt."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        p = prompt_lens[batch_idx]
        return (kv_idx <= q_idx) & ~((q_idx >= p) & (kv_idx == 0) & (q_idx > 0))
    return inner


def batch_mates(prompt_lens, segment_ids):
    """Reads the longest prompt of the batch: a row's mask depends on the others (refused)."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < prompt_lens.max())
    return inner


def width_dependent(prompt_lens, segment_ids):
    """Reads the frame's width (refused)."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx == segment_ids.shape[1] - 1)
    return inner


def sees_nothing(prompt_lens, segment_ids):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return kv_idx < q_idx
    return inner


def not_bool(prompt_lens, segment_ids):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx).float()
    return inner


def python_if(prompt_lens, segment_ids):
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        if kv_idx <= q_idx:
            return True
        return False
    return inner


def late_leak(prompt_lens, segment_ids):
    """Causal on short rows; from position 20 on, a token also sees the next one: a leak no probe row shows."""
    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx <= q_idx) | ((q_idx >= 20) & (kv_idx == q_idx + 1))
    return inner


NOT_A_FUNCTION = 3
