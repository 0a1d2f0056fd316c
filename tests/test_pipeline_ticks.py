"""The lock-step tables the pipelined step runs (`runtime/pipeline_ticks.py`), checked by replaying them: every value
a unit reads must be the one it expects, in a slot no later write has overwritten, and the idle time of the tables
must be the published bubble of each schedule."""

import pytest

from dsv3c.runtime.pipeline_ticks import TickTables, Unit, build_tables
from dsv3c.runtime.schedules import bubble_formula, build_schedule

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb", "dualpipev")
FORWARDS = (Unit.F, Unit.FB, Unit.FB_SPLIT)
INPUT_BACKWARDS = (Unit.B, Unit.B_SPLIT, Unit.FB, Unit.FB_SPLIT)


def replay(tables: TickTables) -> dict[str, int]:
    """Runs the tables on symbols: slots hold ("act", chunk, mb), ("out", chunk, mb), ("grad", chunk, mb) or
    ("res", chunk, mb); every read is checked against what the unit needs. Returns counts of what ran."""
    schedule = tables.schedule
    ranks, chunks = schedule.ranks, schedule.num_chunks
    acts = [dict() for _ in range(ranks)]
    grads = [dict() for _ in range(ranks)]
    res = [dict() for _ in range(ranks)]
    ran = {"F": 0, "B": 0, "W": 0}
    for t in range(tables.ticks):
        arrivals = []
        for r in range(ranks):
            unit = Unit(int(tables.unit[t, r]))
            chunk_list = schedule.chunks_of(r)
            if unit in FORWARDS:
                c, m = chunk_list[tables.f_chunk[t, r]], int(tables.f_mb[t, r])
                slot = int(tables.f_act[t, r])
                if c == 0:
                    acts[r][slot] = ("act", 0, m)  # the embedding's output
                assert acts[r].get(slot) == ("act", c, m), (t, r, c, m)
                res[r][(tables.f_chunk[t, r], int(tables.f_res[t, r]))] = ("res", c, m)
                if c == chunks - 1:
                    acts[r][int(tables.f_out[t, r])] = ("out", c, m)
                else:
                    arrivals.append(("act", schedule.placement[c + 1], (schedule.placement[c + 1] - r) % ranks,
                                     ("act", c + 1, m), tables.act_channels))
                ran["F"] += 1
            if unit not in (Unit.IDLE, Unit.F):
                c, m = chunk_list[tables.b_chunk[t, r]], int(tables.b_mb[t, r])
                assert acts[r].get(int(tables.b_act[t, r])) == ("act", c, m), (t, r, c, m)
                assert res[r].get((tables.b_chunk[t, r], int(tables.b_res[t, r]))) == ("res", c, m)
                if c == chunks - 1 and unit in INPUT_BACKWARDS:
                    assert acts[r].get(int(tables.b_out[t, r])) == ("out", c, m)
                    grads[r][int(tables.b_grad[t, r])] = ("grad", c, m)  # from the loss
                assert grads[r].get(int(tables.b_grad[t, r])) == ("grad", c, m), (t, r, c, m, unit)
                if unit in INPUT_BACKWARDS and c > 0:
                    dst = schedule.placement[c - 1]
                    arrivals.append(("grad", dst, (dst - r) % ranks, ("grad", c - 1, m), tables.grad_channels))
                ran["W" if unit == Unit.W else "B"] += 1
        for kind, dst, delta, value, channels in arrivals:
            table = tables.recv_act if kind == "act" else tables.recv_grad
            slot = int(table[t, dst, channels.index(delta)])
            assert slot < (tables.act_slots if kind == "act" else tables.grad_slots), "a value sent to the trash"
            (acts if kind == "act" else grads)[dst][slot] = value
    return ran


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("ranks", [2, 4, 8])
def test_tables_deliver_every_value_and_have_the_published_bubble(name, ranks):
    schedule = build_schedule(name, ranks, 2 * ranks)
    tables = build_tables(schedule)
    ran = replay(tables)
    assert ran["F"] == ran["B"] == schedule.num_chunks * schedule.microbatches
    assert ran["W"] == len(schedule.weight_actions)
    # at unit costs (F = B = W = 1) the formulas of DeepSeek's table hold for every schedule here
    assert tables.bubble == bubble_formula(name, ranks)


def test_dualpipev_has_the_smallest_bubble_and_1f1b_fewer_slots_than_gpipe():
    """In one unit of time per stage forward (a chunk of a two-chunk schedule costs half), with DualPipeV's pairs
    hiding the forward (F&B = B + W, as DeepSeek's overlap aims): 8 ranks, 16 micro-batches."""
    from fractions import Fraction

    def bubble(name: str) -> Fraction:
        schedule = build_schedule(name, 8, 16)
        part = Fraction(8, schedule.num_chunks)
        return build_tables(schedule, F=part, B=part, W=part, FB=2 * part).bubble

    bubbles = {name: bubble(name) for name in SCHEDULES}
    assert bubbles == {"gpipe": 21, "1f1b": 21, "interleaved": Fraction(21, 2), "zb": 7, "dualpipev": Fraction(7, 2)}
    assert bubbles["dualpipev"] == bubble_formula("dualpipev", 8, Fraction(1, 2), Fraction(1, 2), Fraction(1, 2), 1)
    # 1F1B keeps at most P micro-batches in flight, GPipe all M: the slot counts follow
    slots = {name: build_tables(build_schedule(name, 4, 16)).act_slots for name in ("1f1b", "gpipe")}
    assert slots["1f1b"] < slots["gpipe"]
