"""Training batches from real corpora through Grain: documents -> held-out split -> process shard -> seeded shuffle
-> tokens -> packed sequences, one stream per row -> batches, resumable exactly from a small JSON state.

Grain does the index arithmetic (shuffle, shard, repeat) and the packing (`ConcatThenSplitIterDataset`: documents
concatenated and cut into sequences of exactly `length` tokens, a long document continuing in the next sequence),
and its iterators checkpoint as a dict of a few integers. The first token of every document is written -(id + 1)
in the batch (`dsv3.token_window` decodes it), so the loss never asks a position to predict across a document
boundary; attention still sees earlier documents of the sequence (masking it is not done).

A source serves one stream in order: `batch(step, ...)` must be asked for step after step, and a resumed run calls
`set_state` with what `get_state` returned when its checkpoint was written (the training loop does both).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..frontend.errors import UserError
from ..frontend.spec import DataSpec
from .documents import TextDocuments, TokenDocuments, expand


def _mark_document_starts(element: dict[str, np.ndarray]) -> np.ndarray:
    """A packed sequence with each document's first token written -(id + 1) (the first position of a sequence has
    nothing before it to predict it, so it is left as it is)."""
    tokens, segments = element["tokens"].astype(np.int32), element["tokens_segment_ids"]
    starts = np.zeros(tokens.shape, bool)
    starts[1:] = segments[1:] != segments[:-1]
    return np.where(starts, -tokens - 1, tokens)


class PackedBatches:
    """Batches [rows, length] of packed documents `indices` of `documents` (this process's share: every
    `shard[1]`-th document from `shard[0]`), repeated forever.

    With `shuffle`, each row of a batch is a stream of its own, over every `rows`-th of those documents (all of
    them when there are fewer documents than rows) shuffled with its own seed each epoch: a long document then
    continues down one row from batch to batch instead of filling a whole batch with one source file. Without it
    (held-out data), one stream in document order is cut into batches."""

    def __init__(self, documents: Any, encode: Callable[[int], np.ndarray], indices: np.ndarray, rows: int,
                 length: int, seed: int, shuffle: bool, shard: tuple[int, int] = (0, 1)):
        import grain
        from grain.experimental import ConcatThenSplitIterDataset

        mine = np.asarray(indices, np.int64)[shard[0] :: shard[1]]
        if len(mine) == 0:
            raise UserError(f"process {shard[0]} of {shard[1]} gets no document ({len(indices)} in the split)")

        def stream(docs: np.ndarray, stream_seed: int | None) -> Any:
            ds = grain.MapDataset.source(docs)
            if stream_seed is not None:
                ds = ds.shuffle(seed=stream_seed)
            ds = ds.repeat(None).map(lambda i: {"tokens": encode(int(i))})
            # Documents are read and tokenized when a sequence needs them, on this thread: Grain's default
            # prefetching (16 threads, 500 documents) would tokenize a small corpus many times over before the
            # first step and fight the training step for the cores.
            sync = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
            packed = ConcatThenSplitIterDataset(ds.to_iter_dataset(sync), length_struct={"tokens": length})
            return packed.map(_mark_document_starts)

        if shuffle:
            split = len(mine) >= rows
            self._datasets = [stream(mine[r::rows] if split else mine, (seed * 65537 + r) % 2**32)
                              for r in range(rows)]
        else:
            self._datasets = [stream(mine, None).batch(rows, drop_remainder=True)]
        self._iters = [iter(ds) for ds in self._datasets]
        self.rows, self.length, self.step = rows, length, 0
        digest = hashlib.sha256(np.asarray(indices, np.int64).tobytes()).hexdigest()[:16]
        self.fingerprint = {"documents": len(documents), "split": digest, "rows": rows, "length": length,
                            "seed": seed, "shard": list(shard)}

    def next(self) -> np.ndarray:
        self.step += 1
        if len(self._iters) == 1:
            return next(self._iters[0])
        return np.stack([next(it) for it in self._iters])

    def get_state(self) -> dict[str, Any]:
        """Where the stream is: JSON-serialisable, a few integers per row (Grain's iterator states) and what it is
        over."""
        return {"step": self.step, "grain": [it.get_state() for it in self._iters], "fingerprint": self.fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues exactly where `get_state` was taken: the same batches follow."""
        if state.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
            raise UserError(f"the checkpoint's data position is for another data set or batch shape "
                            f"({state.get('fingerprint')}; this run: {self.fingerprint})")
        self._iters = [iter(ds) for ds in self._datasets]
        for it, row_state in zip(self._iters, state["grain"], strict=True):
            it.set_state(row_state)
        self.step = int(state["step"])


class TextData:
    """The training stream of a `DataSpec`, as the training loop reads data: `batch(step, batch, length)` in step
    order, `get_state`/`set_state`; `held_out` gives the evaluation batches."""

    def __init__(self, train: PackedBatches, held_out: list[np.ndarray], eval_every: int, description: str,
                 global_rows: int):
        self.train = train
        self.held_out = held_out
        self.eval_every = eval_every
        self.description = description
        self.global_rows = global_rows

    def batch(self, step: int, batch: int, length: int) -> np.ndarray:
        """The next batch of this process's rows [batch / processes, length]; `step` must be the stream's."""
        if (batch, length) != (self.global_rows, self.train.length):
            raise UserError(f"the data stream makes batches of {self.global_rows} x {self.train.length}, "
                            f"not {batch} x {length}")
        if step != self.train.step:
            raise UserError(f"the data stream is at step {self.train.step}, not {step} (a resumed run restores "
                            "it from the checkpoint's data state)")
        return self.train.next()

    def get_state(self) -> dict[str, Any]:
        return self.train.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.train.set_state(state)


def resolve(data: DataSpec, base: str | Path, **overrides: Any) -> DataSpec:
    """The spec's data block (or the defaults) with the command line's settings over it, and its paths made
    relative to where they were written (`base`: the spec's directory; the command line's are relative to the
    working directory, as a shell user expects)."""
    fields = {f.name for f in dataclasses.fields(DataSpec)}
    given = {k: v for k, v in overrides.items() if k in fields and v is not None}
    resolved = {}
    for name in ("text", "tokens", "tokenizer"):
        value = getattr(data, name)
        if name not in given and value is not None:
            resolved[name] = ",".join(str(Path(base) / part.strip()) for part in value.split(","))
    if ("text" in given and "tokens" not in given) or ("tokens" in given and "text" not in given):
        resolved["tokens" if "text" in given else "text"] = None  # one source replaces the other
    out = dataclasses.replace(data, **{**resolved, **given})
    if not 0 <= out.eval_fraction < 1:
        raise UserError(f"--eval-fraction must be in [0, 1), got {out.eval_fraction:g}")
    if out.text and out.tokens:
        raise UserError("give text or token files, not both")
    if not (out.text or out.tokens):
        raise UserError("no training data: give --text with --tokenizer, or --tokens (or a data block)")
    if out.text and not out.tokenizer:
        raise UserError("raw text needs a tokenizer: --tokenizer tokenizer.json (`dsv3c tokenizer` trains one)")
    return out


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, held-out) document indices: a seeded `fraction` of the documents (at least one when the fraction
    is not 0, and never all of them) is held out, in document order."""
    held = min(max(math.ceil(n * fraction), 1 if fraction > 0 else 0), n - 1)
    order = np.random.default_rng([seed, 0x5E1D]).permutation(n)
    mask = np.zeros(n, bool)
    mask[order[:held]] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def open_data(data: DataSpec, vocab: int, batch: int, seq: int, seed: int,
              shard: tuple[int, int] | None = None) -> TextData:
    """The training stream and held-out batches for a resolved `DataSpec`: checks every file, the tokenizer against
    `vocab`, and that the batch divides over the processes, before any compile."""
    if shard is None:
        import jax

        shard = (jax.process_index(), jax.process_count())
    if batch % shard[1]:
        raise UserError(f"--batch {batch} does not divide over {shard[1]} processes (each reads its own rows)")
    rows = batch // shard[1]
    if data.text:
        from .tokenizer import check_fits, load_tokenizer

        assert data.tokenizer is not None  # resolve() requires it
        tokenizer = load_tokenizer(data.tokenizer)
        eos_id = check_fits(tokenizer, data.tokenizer, vocab, data.eos)
        files = expand(data.text, "--text")
        documents: Any = TextDocuments(files, data.jsonl_key)

        def encode(i: int) -> np.ndarray:
            return np.asarray([*tokenizer.encode(documents[i]).ids, eos_id], np.int32)

        what = f"{len(documents):,} documents of text in {len(files)} file(s), tokenizer {data.tokenizer}"
    else:
        assert data.tokens is not None
        files = expand(data.tokens, "--tokens")
        documents = TokenDocuments(files, vocab, data.bin_dtype, data.eos_id, piece=seq + 1)
        encode = documents.__getitem__
        what = f"{len(documents):,} documents of token ids in {len(files)} file(s)"
    train_ids, held_ids = split(len(documents), data.eval_fraction, seed)
    train = PackedBatches(documents, encode, train_ids, rows, seq + 1, seed, shuffle=True, shard=shard)
    held_out: list[np.ndarray] = []
    if data.eval_every and len(held_ids):
        evaluation = PackedBatches(documents, encode, held_ids, rows, seq + 1, seed, shuffle=False, shard=shard)
        held_out = [evaluation.next() for _ in range(data.eval_batches)]
    description = f"{what}; {len(held_ids):,} held out"
    return TextData(train, held_out, data.eval_every, description, batch)
