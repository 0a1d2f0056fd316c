"""Held-out evaluation during training: the model's next-token loss on fixed batches, and its perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def held_out_loss(prog: Any, batches: Sequence[np.ndarray]) -> Callable[[Any], dict[str, float]]:
    """state -> {"eval_loss", "eval_ppl"}: the mean next-token loss (`lm_loss`, the main model's: MTP and balance
    terms are training aids) over `batches`, the same batches every time so that the numbers compare across steps;
    the perplexity is exp of it."""

    def evaluate(state: Any) -> dict[str, float]:
        losses = [float(prog.eval_step(state, {"tokens": b})["lm_loss"]) for b in batches]
        loss = sum(losses) / len(losses)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 700.0))}

    return evaluate
