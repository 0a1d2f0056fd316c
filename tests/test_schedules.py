"""The pipeline schedules as data and their simulated timelines (pure Python: nothing is traced or compiled).

Durations are Fractions, so every timeline is exact and the bubbles compare with ==."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction as Fr

import pytest

from dsv3c.runtime.schedules import (
    Action,
    Kind,
    Schedule,
    bubble_formula,
    build_schedule,
    dependencies,
    render_png,
    render_table,
    simulate,
)

# (name, ranks, micro-batches): each schedule at P=4 and P=8, at its smallest valid M and at a larger one
CASES = [
    (name, p, m)
    for p in (4, 8)
    for name, ms in [
        ("gpipe", (p, 2 * p)),
        ("1f1b", (p, 2 * p + 1)),
        ("interleaved", (p, 2 * p)),
        ("zb", (p, 2 * p + 1)),
        ("dualpipev", (2 * p, 2 * p + 3)),
    ]
    for m in ms
]


def _ids(case: tuple[str, int, int]) -> str:
    return "{}-P{}-M{}".format(*case)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_every_action_runs_once_on_the_rank_holding_its_chunk(case):
    name, p, m = case
    s = build_schedule(name, p, m)
    held = {
        "gpipe": lambda r: {r},
        "1f1b": lambda r: {r},
        "zb": lambda r: {r},
        "interleaved": lambda r: {r, r + p},  # virtual=2
        "dualpipev": lambda r: {r, 2 * p - 1 - r},  # the V: chunks 0 and 2P-1 on rank 0
    }[name]
    assert s.num_chunks == len(s.placement) == (1 if name in ("gpipe", "1f1b", "zb") else 2) * p
    counts = Counter(a for program in s.programs for a in program)
    for c in range(s.num_chunks):
        for mb in range(m):
            assert counts[Action(Kind.F, mb, c)] == counts[Action(Kind.B, mb, c)] == 1
            assert counts[Action(Kind.W, mb, c)] in {"zb": {1}, "dualpipev": {0, 1}}.get(name, {0})
    assert all(n == 1 for n in counts.values())
    assert s.split_backward == (name == "zb")
    if name == "dualpipev":  # rank r splits (P-r-1) backwards in step 3, r+1 in step 6, P-r-1 in step 7; it overlaps
        # 2(M-2P+r+1) + (P-r-1) pairs, but for the last rank's first
        assert [sum(a.kind == Kind.W for a in s.programs[r]) for r in range(p)] == [2 * p - r - 1 for r in range(p)]
        assert len(s.overlapped) == sum(2 * (m - 2 * p + r + 1) + p - r - 1 for r in range(p)) - 1
    for r, program in enumerate(s.programs):
        assert {a.stage for a in program} == held(r) == set(s.chunks_of(r))


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_the_timeline_keeps_program_order_and_dependencies(case):
    s = build_schedule(*case)
    t = simulate(s, F=Fr(1), B=Fr(3, 2), W=Fr(1, 2), FB=Fr(5, 2))
    end = {span.action: span.end for spans in t.spans for span in spans}
    for r, spans in enumerate(t.spans):
        assert [span.action for span in spans] == list(s.programs[r])
        for span in spans:
            assert all(end[d] <= span.start for d in dependencies(s, span.action)), span
        units = list(t.units(r))
        for before, after in zip(units, units[1:], strict=False):
            assert before[0].end <= after[0].start
        for unit in units:  # an overlapped pair shares one span, and only a pair does
            assert len({(u.start, u.end) for u in unit}) == 1
            assert (len(unit) == 2) == (tuple(u.action for u in unit) in s.overlapped)


# Durations per chunk (F, B, W): B is the input's backward alone, so a whole backward is B + W.
ANY = [(Fr(1), Fr(1), Fr(1)), (Fr(1), Fr(2), Fr(1, 2)), (Fr(2), Fr(1), Fr(3)), (Fr(1, 3), Fr(5, 7), Fr(0))]
ZB_H1 = [(Fr(1), Fr(1), Fr(1)), (Fr(1), Fr(1), Fr(1, 2)), (Fr(2), Fr(1), Fr(1, 2)), (Fr(1), Fr(3), Fr(1))]  # W <= F, B
# DualPipeV as DeepSeek draws it: F == B, W <= F; FB from no gain (F+B+W) down to all of F hidden (B+W)
DUALPIPEV = [(f, f, w, fb) for f, w in [(Fr(1), Fr(1)), (Fr(1), Fr(1, 2)), (Fr(3, 2), Fr(1, 4))]
             for fb in (None, 2 * f + w - Fr(1, 2), f + w)]


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("gpipe", "1f1b", "interleaved")], ids=_ids)
@pytest.mark.parametrize("times", ANY, ids=lambda t: ",".join(map(str, t)))
def test_gpipe_1f1b_interleaved_idle_exactly_the_formula_at_any_durations(case, times):
    t = simulate(build_schedule(*case), *times)
    formula = bubble_formula(case[0], case[1], *times)
    assert formula == (case[1] - 1) * sum(times)  # (P-1)(F + whole backward), per chunk for interleaved
    assert [t.idle(r) for r in range(case[1])] == [formula] * case[1]  # every rank waits as long
    assert t.bubble == formula


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "zb"], ids=_ids)
@pytest.mark.parametrize("times", ZB_H1, ids=lambda t: ",".join(map(str, t)))
def test_zb_h1_idles_the_formula_while_w_is_at_most_f_and_b(case, times):
    t = simulate(build_schedule(*case), *times)
    f, b, w = times
    assert [t.idle(r) for r in range(case[1])] == [bubble_formula("zb", case[1], *times)] * case[1]
    assert bubble_formula("zb", case[1], *times) == (case[1] - 1) * (f + (b + w) - 2 * w)  # DeepSeek's ZB1P row


@pytest.mark.parametrize("case", [c for c in CASES if c[0] == "dualpipev"], ids=_ids)
@pytest.mark.parametrize("times", DUALPIPEV, ids=lambda t: ",".join(map(str, t)))
def test_dualpipev_idles_the_formula_at_its_most_idle_rank(case, times):
    f, b, w, fb = times
    p = case[1]
    t = simulate(build_schedule(*case), f, b, w, FB=fb)
    formula = bubble_formula("dualpipev", p, f, b, w, FB=fb)
    pp, f_and_b, whole = 2 * p, f + b + w if fb is None else fb, b + w  # DeepSeek's variables
    assert formula == (pp / 2 - 1) * (f_and_b + whole - 3 * w)
    assert t.bubble == formula
    if fb is None:  # no gain from overlapping: every rank does the same work and waits as long
        assert {t.idle(r) for r in range(p)} == {formula}
    else:  # the last two ranks run the most overlapped pairs, so they finish their work soonest
        assert t.idle(p - 1) == t.idle(p - 2) == formula > t.idle(0)


def test_where_the_formulas_stop_holding():
    # ZB-H1 with W > min(F, B): no W is left to fill the wait, a rank idles (P-1) max(F, B), not (P-1)(F+B-W)
    t = simulate(build_schedule("zb", 4, 8), Fr(1), Fr(1, 2), Fr(1))
    assert (t.bubble, bubble_formula("zb", 4, Fr(1), Fr(1, 2), Fr(1))) == (3, Fr(3, 2))
    # DualPipeV with F != B: DeepSeek's picture (and formula) assume F == B
    assert simulate(build_schedule("dualpipev", 4, 8), 1, 2, 1).bubble == 11 != bubble_formula("dualpipev", 4, 1, 2, 1)
    t = simulate(build_schedule("dualpipev", 4, 8), 2, 1, Fr(1, 2))
    assert (t.bubble, bubble_formula("dualpipev", 4, 2, 1, Fr(1, 2))) == (Fr(27, 2), Fr(21, 2))


def test_deepseek_readme_example_dualpipev_4_ranks_10_microbatches():
    # F = input backward = W = 1, a whole backward 2 and an F&B pair 3 cells, as in images/dualpipev.png: rank 0
    # waits 3 cells after its first pair (F7 & B3) and 6 in all
    t = simulate(build_schedule("dualpipev", 4, 10))
    row = render_table(t).splitlines()[0].split()[1:]
    assert row[17:23] == ["F7.0", "b3.1", "b3.1", ".", ".", "."] and row[23:26] == ["F4.1", "b0.0", "b0.0"]
    assert t.idle(0) == row.count(".") == 6 == bubble_formula("dualpipev", 4)
    assert max(t.peak_activations(r) for r in range(4)) == 2 * 4 + 1  # the README's PP+1 (chunks) per device


@pytest.mark.parametrize("p", [4, 8])
def test_dualpipev_has_the_smallest_bubble_on_as_many_devices(p):
    # The same model on p devices with M = 4p: a stage's F = input backward = W = 1, so a chunk of interleaved
    # (v=2) or DualPipeV takes half of each.
    m, half = 4 * p, Fr(1, 2)

    def bubbles(fb):
        timelines = {name: simulate(build_schedule(name, p, m), 1, 1, 1) for name in ("gpipe", "1f1b", "zb")}
        timelines["interleaved"] = simulate(build_schedule("interleaved", p, m), half, half, half)
        timelines["dualpipev"] = simulate(build_schedule("dualpipev", p, m), half, half, half, FB=fb)
        return {name: t.bubble for name, t in timelines.items()}

    plain = bubbles(None)  # no gain from overlapping: DualPipeV ties ZB-H1, (P-1)(F+B-W) either way
    assert plain["dualpipev"] == plain["zb"] == p - 1 < plain["interleaved"] < plain["1f1b"] == plain["gpipe"]
    overlapped = bubbles(Fr(5, 4))  # the pair hides a quarter of a chunk's forward
    assert overlapped["dualpipev"] < min(v for k, v in overlapped.items() if k != "dualpipev")


@pytest.mark.parametrize("p", [4, 8])
def test_1f1b_holds_at_most_p_activations_and_gpipe_all_m(p):
    m = 3 * p
    one_f_one_b, gpipe = simulate(build_schedule("1f1b", p, m)), simulate(build_schedule("gpipe", p, m))
    assert [one_f_one_b.peak_activations(r) for r in range(p)] == [p - r for r in range(p)]
    assert [gpipe.peak_activations(r) for r in range(p)] == [m] * p
    zb = simulate(build_schedule("zb", p, m), 1, 1, Fr(1, 2))
    assert [zb.peak_activations(r) for r in range(p)] == [p - r for r in range(p)]  # ZB-H1 keeps 1F1B's memory


def test_render_table_1f1b_and_zb_on_two_ranks():
    # 1F1B: a whole backward (b) takes B + W = 2; rank 0 waits for rank 1's backwards
    assert render_table(simulate(build_schedule("1f1b", 2, 2))) == (
        "0 F0 F1 .  .  b0 b0 .  b1 b1\n"
        "1 .  F0 b0 b0 F1 b1 b1 .  .\n"
    )
    # ZB-H1: rank 1 holds back its first W, so its backwards reach rank 0 a unit sooner
    assert render_table(simulate(build_schedule("zb", 2, 2))) == (
        "0 F0 F1 .  b0 w0 b1 w1\n"
        "1 .  F0 b0 F1 b1 w0 w1\n"
    )
    # two columns a unit: a column shows what runs at its middle
    assert render_table(simulate(build_schedule("zb", 2, 2)), resolution=0.5).splitlines()[0] == (
        "0 F0 F0 F1 F1 .  .  b0 b0 w0 w0 b1 b1 w1 w1"
    )


def test_render_png_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "dualpipev.png"
    render_png(simulate(build_schedule("dualpipev", 4, 10), FB=2), path)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dualpipev", 4, 7), "at least twice as many micro-batches as ranks"),
        (("interleaved", 4, 6), "multiple of the ranks"),
        (("interleaved", 4, 8, 1), "at least 2 chunks per rank"),
        (("1f1b", 4, 3), "at least as many micro-batches as ranks"),
        (("zb", 4, 3), "at least as many micro-batches as ranks"),
        (("gpipe", 0, 3), "at least one rank"),
        (("pipedream", 4, 8), "unknown pipeline schedule"),
    ],
)
def test_bad_requests_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(*args)


def test_bad_programs_are_refused():
    f, b = Action(Kind.F, 0, 0), Action(Kind.B, 0, 0)
    with pytest.raises(ValueError, match="one F, one B"):
        Schedule("x", 1, 1, 1, (0,), ((f,),))
    with pytest.raises(ValueError, match="chunk 1 is on rank 1"):
        Schedule("x", 2, 1, 2, (0, 1), ((f, b, Action(Kind.F, 0, 1)), (Action(Kind.B, 0, 1),)))
    with pytest.raises(ValueError, match="deadlock"):
        simulate(Schedule("x", 1, 1, 1, (0,), ((b, f),)))
