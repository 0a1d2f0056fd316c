"""Text to `ModelSpec`: the `.dsv3` front end.

Three stages, each with one job:

1. lark (`grammar.lark`, LALR, positions propagated) turns text into a tree of entries `key value* block?`; its syntax
   errors become `SpecError`s with a position and a plain-words message.
2. A schema walker checks every entry against `SCHEMA`, a declarative table of the keys each block allows, what values
   they take, which are required and which dataclass field they fill. Defaults are not repeated here: a field left out
   is simply not passed, so the dataclass defaults in `spec.py` apply.
3. Cross-field checks (`_CHECKS`, one small function per rule) look at the built `ModelSpec` and point back at the
   source through `ModelSpec.positions`.

`positions` keys are "model." followed by the attribute path in `ModelSpec`: `spec.moe.top_k` was written at
`positions["model.moe.top_k"]`, `spec.optimizer.lr` at `positions["model.optimizer.lr"]`; a block that builds its own
dataclass is recorded too (`"model.moe"` is the `ffn moe` entry), and `"model"` is the `model` entry itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ..dialects.remat import POLICIES
from ..dialects.sharding import HEAD_LOSS, MESH_AXES
from .errors import SpecError
from .limits import MAX_INT, MAX_MTP_DEPTH, MAX_NESTING, MAX_NUMBER_CHARS, MAX_SPEC_BYTES
from .source import read_source
from .spec import (
    AttentionSpec,
    DataSpec,
    DenseFFNSpec,
    DTypeSpec,
    InitSpec,
    ModelSpec,
    MoESpec,
    MTPSpec,
    OptimizerSpec,
    ParallelSpec,
    RopeSpec,
    YarnSpec,
)

__all__ = ["SCHEMA", "load", "parse"]

# --------------------------------------------------------------------------------------------------------------------
# Schema vocabulary


@dataclass(frozen=True)
class Bound:
    """A range a numeric value must lie in; `text` completes the sentence "'key' must be ..."."""

    text: str
    test: Callable[[float], bool]


POSITIVE = Bound("positive", lambda v: v > 0)
NON_NEGATIVE = Bound("non-negative", lambda v: v >= 0)
AT_LEAST_ONE = Bound("at least 1", lambda v: v >= 1)
BETA = Bound("in [0, 1)", lambda v: 0 <= v < 1)
FRACTION = Bound("in [0, 1]", lambda v: 0 <= v <= 1)
MTP_DEPTH = Bound(f"in [0, {MAX_MTP_DEPTH}]", lambda v: 0 <= v <= MAX_MTP_DEPTH)


@dataclass(frozen=True)
class Slot:
    """One value written after a key.

    `kind` is "int", "float" (ints accepted), "bool" (`true`/`false`), "word" (one of `choices`) or "name" (any bare
    word or string). `dest` is the dataclass field it fills, None for a value that is only validated (`attention mla`
    names the only kind there is). `label` names a kind-selecting word in messages ("unknown attention kind 'gqa'").
    """

    kind: str
    dest: str | None = None
    choices: tuple[str, ...] = ()
    bound: Bound | None = None
    label: str | None = None


@dataclass(frozen=True)
class Key:
    """An allowed entry: its values, its optional block, whether it must appear.

    With `dest` set, the block builds a dataclass of type `block.target` stored in the parent's field `dest`; without
    it, the block's fields are merged into the parent's dataclass (`layers 61 { dense_first 3 }` fills two
    `ModelSpec` fields), which keeps the text grouped the way people think while the spec stays flat. With `part`,
    they are merged into the parent's field `part` instead, a dataclass (of type `Block.parts[part]`) that several
    entries fill together (`optimizer` and `schedule` both fill `ModelSpec.optimizer`).
    """

    slots: tuple[Slot, ...] = ()
    block: Block | None = None
    required: bool = False
    dest: str | None = None
    part: str | None = None


@dataclass(frozen=True)
class Variants:
    """A key whose first value picks one of several entries (`ffn dense`, `ffn moe`); each is a key of its own for
    duplicate detection."""

    label: str
    cases: Mapping[str, Key]


@dataclass(frozen=True)
class Block:
    """The keys allowed inside `{ ... }`; `target` is the dataclass the block builds when its key has a `dest`."""

    keys: Mapping[str, Key | Variants]
    target: type | None = None
    parts: Mapping[str, type] = field(default_factory=dict)


def _int(dest: str, bound: Bound | None = POSITIVE) -> Slot:
    return Slot("int", dest, bound=bound)


def _float(dest: str, bound: Bound | None = POSITIVE) -> Slot:
    return Slot("float", dest, bound=bound)


def _bool(dest: str) -> Slot:
    return Slot("bool", dest)


def _word(dest: str | None, *choices: str, label: str | None = None) -> Slot:
    return Slot("word", dest, choices=choices, label=label)


def _field(slot: Slot, required: bool = False) -> Key:
    """A plain `key value` entry."""
    return Key((slot,), required=required)


_DTYPES = ("f32", "bf16", "f16")

_YARN = Block(
    {
        "factor": _field(_float("factor", AT_LEAST_ONE), required=True),
        "original_len": _field(_int("original_len"), required=True),
        "beta_fast": _field(_float("beta_fast")),
        "beta_slow": _field(_float("beta_slow")),
        # 0 is allowed: HF configs that leave an mscale out mean 0 (no cos/sin ratio, no softmax rescale)
        "mscale": _field(_float("mscale", NON_NEGATIVE)),
        "mscale_all_dim": _field(_float("mscale_all_dim", NON_NEGATIVE)),
    },
    YarnSpec,
)

_ROPE = Block(
    {
        "theta": _field(_float("theta")),
        "layout": _field(_word("layout", "interleaved", "half")),
        "yarn": Key(block=_YARN, dest="yarn"),
    },
    RopeSpec,
)

_ATTENTION = Block(
    {
        "heads": _field(_int("heads"), required=True),
        "q_lora_rank": _field(_int("q_lora_rank", NON_NEGATIVE), required=True),
        "kv_lora_rank": _field(_int("kv_lora_rank"), required=True),
        "head_dim": Key(
            block=Block(
                {
                    "nope": _field(_int("nope_dim"), required=True),
                    "rope": _field(_int("rope_dim"), required=True),
                    "v": _field(_int("v_dim"), required=True),
                }
            ),
            required=True,
        ),
        "rope": Key(block=_ROPE, dest="rope"),
    },
    AttentionSpec,
)

_DENSE_FFN = Block(
    {
        "hidden": _field(_int("hidden"), required=True),
        "act": _field(_word("act", "swiglu")),
    },
    DenseFFNSpec,
)

_MOE = Block(
    {
        "experts": Key(
            (_int("experts"),),
            Block(
                {
                    "top_k": _field(_int("top_k"), required=True),
                    "shared": _field(_int("shared", NON_NEGATIVE)),
                    "hidden": _field(_int("hidden"), required=True),
                }
            ),
            required=True,
        ),
        "routing": Key(
            (_word("score", "sigmoid", "softmax", label="routing score"),),
            Block(
                {
                    "groups": _field(_int("groups")),
                    "keep_groups": _field(_int("keep_groups")),
                    "scale": _field(_float("scale")),
                    "normalize": _field(_bool("normalize")),
                    "bias": _field(_bool("router_bias")),
                }
            ),
        ),
        "balance": Key(
            block=Block(
                {
                    "bias_rate": _field(_float("bias_rate", NON_NEGATIVE)),
                    "seq_aux": _field(_float("seq_aux", NON_NEGATIVE)),
                }
            )
        ),
    },
    MoESpec,
)

_MODEL = Block(
    {
        "vocab": _field(_int("vocab"), required=True),
        "dim": _field(_int("dim"), required=True),
        "layers": Key((_int("layers"),), Block({"dense_first": _field(_int("dense_first", NON_NEGATIVE))}), True),
        "norm": Key((_word(None, "rms", label="norm kind"),), Block({"eps": _field(_float("norm_eps"))})),
        "attention": Key((_word(None, "mla", label="attention kind"),), _ATTENTION, required=True, dest="attention"),
        "ffn": Variants(
            "ffn kind",
            {"dense": Key(block=_DENSE_FFN, dest="dense_ffn"), "moe": Key(block=_MOE, dest="moe")},
        ),
        "mtp": Key(
            block=Block(
                {"depth": _field(_int("depth", MTP_DEPTH)), "weight": _field(_float("weight", NON_NEGATIVE))},
                MTPSpec,
            ),
            dest="mtp",
        ),
        "head": Key(block=Block({"tied": _field(_bool("tied_head"))})),
        "init": Key(
            block=Block({"std": _field(_float("std")), "mla_std": _field(_float("mla_std"))}, InitSpec),
            dest="init",
        ),
        "grad_mask": Key(block=Block({"threshold": _field(_float("grad_mask_threshold"), required=True)})),
        "dtype": Key(
            block=Block(
                {"params": _field(_word("params", *_DTYPES)), "compute": _field(_word("compute", *_DTYPES))},
                DTypeSpec,
            ),
            dest="dtypes",
        ),
    }
)

_DATA = Block(
    {
        "text": _field(Slot("name", "text")),
        "tokenizer": _field(Slot("name", "tokenizer")),
        "jsonl_key": _field(Slot("name", "jsonl_key")),
        "eos": _field(Slot("name", "eos")),
        "tokens": _field(Slot("name", "tokens")),
        "bin_dtype": _field(_word("bin_dtype", "uint16", "uint32", "int32")),
        "eos_id": _field(_int("eos_id", NON_NEGATIVE)),
        "eval_fraction": _field(_float("eval_fraction", Bound("in [0, 1)", lambda v: 0 <= v < 1))),
        "eval_every": _field(_int("eval_every", NON_NEGATIVE)),
        "eval_batches": _field(_int("eval_batches")),
    },
    DataSpec,
)

_TRAIN = Block(
    {
        "optimizer": Key(
            part="optimizer",
            slots=(_word("kind", "adamw", label="optimizer"),),
            block=Block(
                {
                    "lr": _field(_float("lr")),
                    "betas": Key((_float("b1", BETA), _float("b2", BETA))),
                    "eps": _field(_float("eps")),
                    "weight_decay": _field(_float("weight_decay", NON_NEGATIVE)),
                    "clip": _field(_float("clip", NON_NEGATIVE)),  # 0 turns clipping off
                    "moments": _field(_word("moments", *_DTYPES)),
                    "grads": _field(_word("grads", "compute", "f32")),
                }
            ),
        ),
        "schedule": Key(
            part="optimizer",
            slots=(_word("schedule", "cosine", "linear", "constant", label="schedule"),),
            block=Block(
                {
                    "warmup": _field(_int("warmup", NON_NEGATIVE)),
                    "decay_steps": _field(_int("decay_steps", NON_NEGATIVE)),
                    "min_lr_ratio": _field(_float("min_lr_ratio", FRACTION)),
                }
            ),
        ),
        "data": Key(block=_DATA, dest="data"),
        "ema": Key(part="optimizer", block=Block({"decay": _field(_float("ema_decay", BETA), required=True)})),
    },
    parts={"optimizer": OptimizerSpec},
)

_PARALLEL = Block(
    {
        "mesh": Key(block=Block({axis: _field(_int(axis)) for axis in MESH_AXES}), required=True, dest="mesh"),
        "shard_mode": _field(_word("shard_mode", "auto", "explicit")),
        "remat": _field(_word("remat", *POLICIES)),
        "head_loss": _field(_word("head_loss", *HEAD_LOSS)),
        "target": _field(Slot("name", "target")),
    },
    ParallelSpec,
)

SCHEMA = Block(
    {
        "model": Key((Slot("name", "name", label="model name"),), _MODEL, required=True),
        "train": Key(block=_TRAIN),
        "parallel": Key(block=_PARALLEL, dest="parallel"),
    }
)
"""The whole language: the top level holds `model NAME { ... }` (required), `train { ... }` and `parallel { ... }`
(optional). All fill `ModelSpec`, which `parse` builds itself because it also needs the file name and the
positions."""

# --------------------------------------------------------------------------------------------------------------------
# Syntax: text -> entries


@dataclass(frozen=True)
class Value:
    """One written value; `kind` is the token type (NAME, NUMBER, STRING)."""

    kind: str
    text: str
    line: int
    col: int


@dataclass(frozen=True)
class Entry:
    """`key value* block?` with the positions needed for messages; `block is None` when no `{` was written."""

    key: str
    line: int
    col: int
    values: tuple[Value, ...]
    block: tuple[Entry, ...] | None = None
    brace: tuple[int, int] = (0, 0)


@cache
def _lark() -> Lark:
    grammar = Path(__file__).with_name("grammar.lark").read_text()
    return Lark(grammar, parser="lalr", propagate_positions=True)


_TOKEN_NAMES = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "_SEP": "a newline or ','",
    "$END": "end of input",
}


def _syntax_tree(text: str, path: str) -> Tree:
    """Parses with lark; a trailing newline is added so that a comment on the last line still ends a separator."""
    _check_nesting(text, path)
    try:
        return _lark().parse(text if text.endswith("\n") else text + "\n")
    except UnexpectedInput as exc:
        raise _syntax_error(exc, text, path) from None


def _syntax_error(exc: UnexpectedInput, text: str, path: str) -> SpecError:
    """Rewords a lark error: what was found, where, and what could have come instead."""
    if isinstance(exc, UnexpectedCharacters):
        char = text[exc.pos_in_stream]
        message = "unterminated string" if char == '"' else f"unexpected character {char!r}"
        return SpecError(message, path, exc.line, exc.column)
    if isinstance(exc, UnexpectedEOF) or (isinstance(exc, UnexpectedToken) and exc.token.type == "$END"):
        return _eof_error(text, path)
    assert isinstance(exc, UnexpectedToken)
    # `accepts` is exact; `expected` (the fallback) may hold tokens that LALR state merging let in.
    expected = sorted({_TOKEN_NAMES.get(name, repr(name)) for name in exc.accepts or exc.expected})
    found = "a newline" if exc.token.type == "_SEP" and "\n" in exc.token else repr(str(exc.token).strip(" \t"))
    hint = " (a block must open on the line of its key)" if exc.token.type == "LBRACE" else ""
    return SpecError(f"unexpected {found}{hint}; expected {' or '.join(expected)}", path, exc.line, exc.column)


_BRACE_SCAN = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|[{}]')


def _eof_error(text: str, path: str) -> SpecError:
    """The usual cause of a premature end is an unclosed `{`: point at it rather than at the end of the file."""
    opened: list[int] = []
    for match in _BRACE_SCAN.finditer(text):
        if match.group() == "{":
            opened.append(match.start())
        elif match.group() == "}" and opened:
            opened.pop()
    if opened:
        line, col = _line_col(text, opened[-1])
        return SpecError("unexpected end of input: this '{' is never closed", path, line, col)
    line, col = _line_col(text, len(text.rstrip()))
    return SpecError("unexpected end of input", path, line, col)


def _check_nesting(text: str, path: str) -> None:
    """Refuses nesting deeper than the language uses before lark builds a tree whose conversion would recurse once
    per level (thousands of `{` would end in a RecursionError)."""
    depth = 0
    for match in _BRACE_SCAN.finditer(text):
        if match.group() == "{":
            depth += 1
            if depth > MAX_NESTING:
                line, col = _line_col(text, match.start())
                raise SpecError(f"blocks nested deeper than {MAX_NESTING} levels", path, line, col)
        elif match.group() == "}":
            depth = max(depth - 1, 0)


def _line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _entries(tree: Tree) -> tuple[Entry, ...]:
    return tuple(_entry(child) for child in tree.children if isinstance(child, Tree))


def _entry(tree: Tree) -> Entry:
    key, *rest = tree.children
    values = tuple(Value(t.type, str(t), t.line, t.column) for t in rest if isinstance(t, Token))
    blocks = [t for t in rest if isinstance(t, Tree)]
    if not blocks:
        return Entry(str(key), tree.meta.line, tree.meta.column, values)
    brace = blocks[0].children[0]
    return Entry(str(key), tree.meta.line, tree.meta.column, values, _entries(blocks[0]), (brace.line, brace.column))


# --------------------------------------------------------------------------------------------------------------------
# Schema walk: entries -> dataclasses


@dataclass
class _Walk:
    """State shared by one walk over a file: where errors are reported and where positions are recorded."""

    path: str
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)

    def fail(self, message: str, line: int, col: int) -> SpecError:
        return SpecError(message, self.path, line, col)

    def build(self, block: Block, entries: tuple[Entry, ...], where: str, at: tuple[int, int], spath: str) -> Any:
        """Builds `block.target` from a block's entries; `where` names the block in messages ("in rope block")."""
        kwargs: dict[str, Any] = {}
        self.fill(block, entries, where, at, spath, kwargs)
        return block.target(**kwargs) if block.target else kwargs

    def fill(
        self, block: Block, entries: tuple[Entry, ...], where: str, at: tuple[int, int], spath: str, kwargs: dict
    ) -> None:
        """Checks a block's entries and writes the fields they give into `kwargs`; `spath` is the attribute path of
        the dataclass being filled, for `positions`."""
        seen: dict[str, Entry] = {}
        for entry in entries:
            name, key, values = self.resolve(block, entry, where)
            if name in seen:
                first = seen[name]
                raise self.fail(
                    f"duplicate key '{name}' {where} (first given at line {first.line})", entry.line, entry.col
                )
            seen[name] = entry
            if key.part is None:
                self.entry(entry, name, key, values, spath, kwargs)
            else:
                self.positions.setdefault(f"{spath}.{key.part}", (entry.line, entry.col))
                self.entry(entry, name, key, values, f"{spath}.{key.part}", kwargs.setdefault(key.part, {}))
        for name, key in block.keys.items():
            if isinstance(key, Key) and key.required and name not in seen:
                raise self.fail(f"missing required field '{name}' {where}", *at)
        for part, target in block.parts.items():
            if part in kwargs:
                kwargs[part] = target(**kwargs[part])

    def resolve(self, block: Block, entry: Entry, where: str) -> tuple[str, Key, tuple[Value, ...]]:
        """Finds the schema of an entry, the name it goes by and the values left for its slots. A `Variants` key is
        resolved by its first value, which it consumes: `ffn moe` is then a key of its own."""
        key = block.keys.get(entry.key)
        if key is None:
            raise self.fail(
                f"unknown key '{entry.key}' {where}{_suggest(entry.key, block.keys)}", entry.line, entry.col
            )
        if isinstance(key, Key):
            return entry.key, key, entry.values
        options = ", ".join(key.cases)
        if not entry.values:
            raise self.fail(f"'{entry.key}' needs its {key.label} (one of: {options})", entry.line, entry.col)
        kind = entry.values[0]
        if kind.text not in key.cases or kind.kind != "NAME":
            raise self.fail(f"unknown {key.label} {kind.text!r} (expected one of: {options})", kind.line, kind.col)
        return f"{entry.key} {kind.text}", key.cases[kind.text], entry.values[1:]

    def entry(self, entry: Entry, name: str, key: Key, values: tuple[Value, ...], spath: str, kwargs: dict) -> None:
        """Converts one entry's values and block into fields of `kwargs` (or of a nested dataclass)."""
        if key.block is None and entry.block is not None:
            raise self.fail(f"'{name}' takes a value, not a block", *entry.brace)
        self.check_count(entry, name, key, values)
        here = (entry.line, entry.col)
        for slot, value in zip(key.slots, values, strict=True):
            converted = self.convert(entry.key, slot, value)
            if slot.dest is not None:
                kwargs[slot.dest] = converted
                self.positions[f"{spath}.{slot.dest}"] = here
        if key.block is None:
            return
        block_entries = entry.block or ()
        where = f"in {name} block"
        if key.dest is None:
            self.fill(key.block, block_entries, where, here, spath, kwargs)
        else:
            self.positions[f"{spath}.{key.dest}"] = here
            kwargs[key.dest] = self.build(key.block, block_entries, where, here, f"{spath}.{key.dest}")

    def check_count(self, entry: Entry, name: str, key: Key, values: tuple[Value, ...]) -> None:
        """Too many values are blamed on the first extra one, too few on the entry."""
        wanted, got = len(key.slots), len(values)
        if got > wanted:
            extra = values[wanted]
            if wanted == 0:
                message = f"'{name}' takes no value; write its fields in a block: {name} {{ ... }}"
            else:
                message = f"'{name}' takes {_values(wanted)}, got {got}"
            raise self.fail(message, extra.line, extra.col)
        if got < wanted:
            slot = key.slots[got]
            if slot.label and wanted == 1:
                choices = f" (one of: {', '.join(slot.choices)})" if slot.choices else ""
                message = f"'{name}' needs its {slot.label}{choices}"
            else:
                message = f"'{name}' takes {_values(wanted)}, got {got}"
            raise self.fail(message, entry.line, entry.col)

    def convert(self, key: str, slot: Slot, value: Value) -> Any:
        """Turns a written value into the Python value its slot wants, or says why it cannot."""
        if value.kind == "NUMBER" and len(value.text) > MAX_NUMBER_CHARS:
            raise self.fail(f"'{key}': number too long ({len(value.text)} characters)", value.line, value.col)
        converted = _CONVERTERS[slot.kind](slot, value)
        if converted is None:
            raise self.fail(_type_message(key, slot, value), value.line, value.col)
        if slot.bound is not None and not slot.bound.test(converted):
            raise self.fail(f"'{key}' must be {slot.bound.text}, got {value.text}", value.line, value.col)
        if slot.kind == "int" and abs(converted) > MAX_INT:
            raise self.fail(f"'{key}' must be at most {MAX_INT}, got {value.text}", value.line, value.col)
        if slot.kind == "float" and not math.isfinite(converted):
            raise self.fail(f"'{key}' must be a finite number, got {value.text}", value.line, value.col)
        return converted


def _values(n: int) -> str:
    return "1 value" if n == 1 else f"{n} values"


def _suggest(word: str, allowed: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(word, list(allowed), n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (expected one of: {', '.join(allowed)})"


_INT = re.compile(r"[+-]?\d+")


def _to_int(slot: Slot, value: Value) -> int | None:
    return int(value.text) if value.kind == "NUMBER" and _INT.fullmatch(value.text) else None


def _to_float(slot: Slot, value: Value) -> float | None:
    return float(value.text) if value.kind == "NUMBER" else None


def _to_bool(slot: Slot, value: Value) -> bool | None:
    return {"true": True, "false": False}.get(value.text) if value.kind == "NAME" else None


def _to_word(slot: Slot, value: Value) -> str | None:
    return value.text if value.kind == "NAME" and value.text in slot.choices else None


def _to_name(slot: Slot, value: Value) -> str | None:
    if value.kind == "STRING":
        return re.sub(r"\\(.)", r"\1", value.text[1:-1])
    return value.text if value.kind == "NAME" else None


_CONVERTERS: dict[str, Callable[[Slot, Value], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "word": _to_word,
    "name": _to_name,
}

_EXPECTS = {"int": "an integer", "float": "a number", "bool": "true or false", "name": "a name"}


def _type_message(key: str, slot: Slot, value: Value) -> str:
    if slot.kind != "word":
        return f"'{key}' expects {_EXPECTS[slot.kind]}, got '{value.text}'"
    choices = ", ".join(slot.choices)
    if slot.label:
        return f"unknown {slot.label} '{value.text}' (expected one of: {choices})"
    return f"'{key}' expects one of: {choices}; got '{value.text}'"


# --------------------------------------------------------------------------------------------------------------------
# Cross-field checks: rules that relate several fields, run on the built spec


@dataclass(frozen=True)
class Problem:
    """A broken rule: the message and the `positions` path of the field to blame."""

    where: str
    message: str


def _check_dense_first(spec: ModelSpec) -> Iterator[Problem]:
    if spec.dense_first > spec.layers:
        yield Problem("model.dense_first", f"dense_first ({spec.dense_first}) exceeds layers ({spec.layers})")
    elif spec.moe is not None and spec.dense_first == spec.layers:
        yield Problem(
            "model.dense_first",
            f"dense_first ({spec.dense_first}) equals layers: no layer would use the 'ffn moe' block",
        )
    elif spec.moe is None and "model.dense_first" in spec.positions and spec.dense_first != spec.layers:
        yield Problem(
            "model.dense_first",
            f"dense_first ({spec.dense_first}) needs an 'ffn moe' block: without one all {spec.layers} layers are "
            "dense",
        )


def _check_dense_ffn(spec: ModelSpec) -> Iterator[Problem]:
    dense = spec.layers if spec.moe is None else spec.dense_first
    if dense and spec.dense_ffn is None:
        where = "model.dense_first" if spec.moe is not None else "model"
        yield Problem(where, f"missing 'ffn dense' block: {dense} of {spec.layers} layers are dense")


def _check_experts(spec: ModelSpec) -> Iterator[Problem]:
    moe = spec.moe
    if moe is None:
        return
    if moe.top_k > moe.experts:
        yield Problem("model.moe.top_k", f"top_k ({moe.top_k}) is larger than the number of experts ({moe.experts})")
    elif moe.experts % moe.groups:
        yield Problem("model.moe.groups", f"groups ({moe.groups}) does not divide experts ({moe.experts})")
    elif moe.keep_groups > moe.groups:
        yield Problem("model.moe.keep_groups", f"keep_groups ({moe.keep_groups}) exceeds groups ({moe.groups})")
    elif moe.top_k > moe.keep_groups * moe.experts // moe.groups:
        kept = moe.keep_groups * moe.experts // moe.groups
        yield Problem(
            "model.moe.top_k",
            f"top_k ({moe.top_k}) exceeds the experts in the kept groups (keep_groups*experts/groups = {kept})",
        )


def _check_rope(spec: ModelSpec) -> Iterator[Problem]:
    att = spec.attention
    if att.rope_dim % 2:
        yield Problem("model.attention.rope_dim", f"rope head dim must be even (it rotates pairs), got {att.rope_dim}")
    yarn = att.rope.yarn
    if yarn is not None and yarn.beta_fast <= yarn.beta_slow:
        yield Problem(
            "model.attention.rope.yarn.beta_fast",
            f"beta_fast ({yarn.beta_fast:g}) must exceed beta_slow ({yarn.beta_slow:g})",
        )


def _check_parallel(spec: ModelSpec) -> Iterator[Problem]:
    if spec.parallel is not None and not spec.parallel.mesh:
        yield Problem("model.parallel.mesh", f"the mesh names no axis (axes: {', '.join(MESH_AXES)})")


_CHECKS: tuple[Callable[[ModelSpec], Iterator[Problem]], ...] = (
    _check_dense_first,
    _check_dense_ffn,
    _check_experts,
    _check_rope,
    _check_parallel,
)
"""Rules no single field can state. Each yields at most a few problems; the first one found is reported."""


def _verify(spec: ModelSpec) -> None:
    for check in _CHECKS:
        for problem in check(spec):
            where = spec.positions.get(problem.where) or spec.positions.get(problem.where.rsplit(".", 1)[0], (0, 0))
            raise SpecError(problem.message, spec.path, *where)


# --------------------------------------------------------------------------------------------------------------------
# Public API


def parse(text: str, filename: str = "<string>") -> ModelSpec:
    """Parses and validates `.dsv3` text; every problem is a `SpecError` pointing at the offending text."""
    walk = _Walk(filename)
    entries = _entries(_syntax_tree(text, filename))
    kwargs = walk.build(SCHEMA, entries, "at top level", (1, 1), "model")
    model = next(e for e in entries if e.key == "model")
    walk.positions["model"] = (model.line, model.col)
    spec = ModelSpec(**kwargs, path=filename, positions=walk.positions)
    _verify(spec)
    if spec.moe is None:
        # Without MoE every layer is dense; say so in `dense_first` too, so it always counts the leading dense layers.
        spec = dataclasses.replace(spec, dense_first=spec.layers)
    return spec


def load(path: str | Path) -> ModelSpec:
    """Reads and parses a `.dsv3` file; errors name the file as given."""
    return parse(read_source(path, "spec", MAX_SPEC_BYTES), str(path))
