"""Training corpora as random-access lists of documents: raw text (plain files, JSON lines, ArrayRecord) and token-id
shards (`.npy`, raw `.bin`).

Random access (`len`, `docs[i]`) is what Grain's `MapDataset` shuffles, shards and checkpoints by index, so a
document is found again from its index alone: nothing is read until a document is asked for, except the small
indexes built here (line offsets of JSON-lines files, document ends of token shards).
"""

from __future__ import annotations

import glob
import json
import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..frontend.errors import UserError


def expand(patterns: str | Sequence[str], what: str, base: str | Path = ".") -> list[Path]:
    """The files a glob (or several, comma-separated or a list) names, sorted, relative to `base`; a pattern that
    names no file is an error naming it."""
    if isinstance(patterns, str):
        patterns = [p for p in patterns.split(",") if p.strip()]
    files: list[Path] = []
    for pattern in patterns:
        full = Path(base) / Path(pattern.strip()).expanduser()
        found = sorted(Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
        if not found:
            raise UserError(f"{what}: no file matches {pattern.strip()}" + (f" (under {base})" if base != "." else ""))
        files += found
    return files


class TextDocuments:
    """Documents of raw text: each line of a `.jsonl` file (its `key` field), each record of an `.array_record` file
    (UTF-8), or a whole other file. Bytes that are not UTF-8 are replaced, not fatal: one odd byte in a large corpus
    should not stop a run."""

    def __init__(self, files: Sequence[Path], key: str = "text"):
        self.key = key
        self._where: list[tuple[int, int, int]] = []  # (file, start, end) per document; end -1: the whole file
        self.files = list(files)
        self._records: dict[int, object] = {}
        for f, path in enumerate(self.files):
            if path.suffix == ".jsonl":
                self._where += [(f, start, end) for start, end in _line_spans(path)]
            elif path.suffix == ".array_record":
                self._where += [(f, r, r + 1) for r in range(len(self._record_source(f)))]
            else:
                self._where.append((f, 0, -1))
        if not self._where:
            raise UserError(f"no documents in {len(self.files)} text file(s) (all empty?)")

    def _record_source(self, f: int):
        if f not in self._records:
            from grain.sources import ArrayRecordDataSource

            try:
                self._records[f] = ArrayRecordDataSource([str(self.files[f])])
            except Exception as err:  # array_record raises plain RuntimeErrors on a bad file
                raise UserError(f"{self.files[f]}: not a readable ArrayRecord file ({err})") from None
        return self._records[f]

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i: int) -> str:
        f, start, end = self._where[i]
        path = self.files[f]
        if path.suffix == ".array_record":
            return bytes(self._record_source(f)[start]).decode("utf-8", errors="replace")
        if end < 0:
            return path.read_bytes().decode("utf-8", errors="replace")
        with open(path, "rb") as handle:
            handle.seek(start)
            line = handle.read(end - start)
        try:
            value = json.loads(line)
        except ValueError:
            raise UserError(f"{path}: line at byte {start} is not valid JSON") from None
        if not isinstance(value, dict) or not isinstance(value.get(self.key), str):
            raise UserError(f"{path}: line at byte {start} has no string field '{self.key}' (set jsonl_key)")
        return value[self.key]


def _line_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte offsets of the non-blank lines of a file, found with one vectorised scan."""
    size = path.stat().st_size
    if size == 0:
        return []
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
        bounds = np.concatenate([[0], ends + 1, [size]])
        spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if data[a:b].strip()]
    return spans


class TokenDocuments:
    """Documents of token ids from memory-mapped shards (`.npy` arrays, or raw `.bin` files of `bin_dtype`): cut
    after each `eos_id` when one is given (the separator stays with the document it ends), else into pieces of
    `piece` tokens, each then treated as a document of its own."""

    def __init__(self, files: Sequence[Path], vocab: int, bin_dtype: str = "uint16", eos_id: int | None = None,
                 piece: int = 4096):
        self.shards = [_token_shard(path, bin_dtype) for path in files]
        self._spans: list[tuple[int, int, int]] = []
        for s, (path, shard) in enumerate(zip(files, self.shards, strict=True)):
            if shard.size == 0:
                continue
            low, high = int(shard.min()), int(shard.max())
            if low < 0 or high >= vocab:
                raise UserError(f"{path} has token ids in [{low}, {high}], outside the vocabulary [0, {vocab})")
            if eos_id is not None:
                cuts = np.concatenate([[0], np.flatnonzero(shard == eos_id) + 1, [shard.size]])
            else:
                cuts = np.concatenate([np.arange(0, shard.size, piece), [shard.size]])
            self._spans += [(s, int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
        if not self._spans:
            raise UserError(f"no tokens in {len(self.shards)} token file(s)")

    def __len__(self) -> int:
        return len(self._spans)

    def __getitem__(self, i: int) -> np.ndarray:
        s, a, b = self._spans[i]
        return np.asarray(self.shards[s][a:b], np.int32)


def _token_shard(path: Path, bin_dtype: str) -> np.ndarray:
    """A shard's token ids as one memory-mapped 1-D array."""
    if path.suffix == ".npy":
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"{path} is not a readable .npy array of token ids ({err})") from None
    elif path.suffix == ".bin":
        itemsize = np.dtype(bin_dtype).itemsize
        if path.stat().st_size % itemsize:
            raise UserError(f"{path}: {path.stat().st_size} bytes is not a whole number of {bin_dtype} token ids")
        data = np.memmap(path, np.dtype(bin_dtype).newbyteorder("<"), mode="r") if path.stat().st_size else \
            np.zeros(0, np.int32)
    else:
        raise UserError(f"{path}: token files are .npy or .bin (raw {bin_dtype}); for text use --text")
    if not np.issubdtype(data.dtype, np.integer):
        raise UserError(f"{path} holds {data.dtype} values; token ids must be integers")
    return data.reshape(-1)
