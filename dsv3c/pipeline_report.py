"""The report's `pipeline` section: the schedule a pipelined train step runs, its bubble, what each rank holds, and
the timeline of its tick tables, as text and as a picture."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .runtime.lower.dtypes import result_dtype
from .runtime.pipeline_ticks import build_tables
from .runtime.schedules import bubble_formula, render_png, render_table, simulate
from .runtime.stages import StageLayout


def pipeline_report(layout: StageLayout, batch: int, seq: int) -> dict[str, Any]:
    """The `pipeline` section of a pipelined module with stage layout `layout`: CONTRACT.md's `schedule`, `stages` (the
    ranks along `pipe`), `microbatches` and `bubble_fraction`, and more. Bubbles are in units of one chunk's forward
    (F = B = W = 1), the costs the tables are ordered by; `bubble` is what the compiled tables leave idle on the
    rank that waits longest, `bubble_formula` DeepSeek's closed form for the same costs."""
    schedule = layout.schedule
    tables = build_tables(schedule)
    stack = layout.stacks[0].op
    hidden = stack.operands[0]
    width = math.prod(d for d in hidden.type.get_shape() if d > 0)
    slot_bytes = batch // schedule.microbatches * seq * width * result_dtype(hidden).itemsize
    return {
        "schedule": schedule.name,
        "stages": layout.ranks,
        "ranks": layout.ranks,
        "chunks": schedule.num_chunks,
        "microbatches": schedule.microbatches,
        "placement": list(schedule.placement),
        "layers_per_chunk": {s.op.layer_kind.data: list(s.layers) for s in layout.stacks},
        "chunk_cost_flops_per_token": layout.pipeline.chunk_costs,
        "ticks": tables.ticks,
        "bubble": float(tables.bubble),
        "bubble_formula": bubble_formula(schedule.name, layout.ranks),
        "bubble_fraction": float(tables.bubble_fraction),
        "held_per_rank": {"activations": tables.act_slots, "gradients": tables.grad_slots,
                          "residuals": list(tables.res_slots)},
        "activation_slot_bytes": slot_bytes,
        "stage_rows": {s.op.layer_kind.data: s.rows for s in layout.stacks},
        "timeline": render_table(simulate(schedule)),
    }


def write_timeline_png(layout: StageLayout, path: str | Path) -> bool:
    """Draws the schedule's timeline to `path`; False without matplotlib."""
    try:
        render_png(simulate(layout.schedule), path)
    except ImportError:
        return False
    return True
