"""Training data: a synthetic learnable token stream, or windows of a token-id file.

Batch `s` depends only on (seed, s), never on earlier batches, so a run resumed from a checkpoint at step s sees
exactly the batches an uninterrupted run would have seen."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..frontend.errors import UserError


def _rng(seed: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, step])


class SyntheticStream:
    """Sequences following a fixed hidden rule of the previous two tokens, t[i+1] = perm[(t[i] + shift[t[i-1]]) % V],
    with a random start. A model must use attention (not just bigrams) to drive the loss near zero; a model that
    learns nothing stays at ln(vocab)."""

    def __init__(self, vocab: int, seed: int = 0):
        rule = np.random.default_rng([seed, 2**31 - 1])
        self.vocab = vocab
        self.perm = rule.permutation(vocab)
        self.shift = rule.integers(0, vocab, vocab)
        self.seed = seed

    def batch(self, step: int, batch: int, length: int) -> np.ndarray:
        rng = _rng(self.seed, step)
        tokens = np.empty((batch, length), np.int32)
        tokens[:, :2] = rng.integers(0, self.vocab, (batch, 2))
        for i in range(2, length):
            tokens[:, i] = self.perm[(tokens[:, i - 1] + self.shift[tokens[:, i - 2]]) % self.vocab]
        return tokens


def read_token_ids(path: str | Path) -> np.ndarray:
    """The token ids of a `.npy` file, memory-mapped; anything else (a missing file, a `.npz` archive, floats) is a
    `--data` user error. Cheap enough to run before compiling, so a bad file is refused first."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data: no such file: {path}" if not path.exists() else f"--data: {path} is not a file")
    try:
        data = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"--data: {path} is not a readable .npy array of token ids ({err})") from None
    if not isinstance(data, np.ndarray):
        raise UserError(f"--data: {path} is a .npz archive; save one array of token ids with numpy.save (.npy)")
    if not np.issubdtype(data.dtype, np.integer):
        raise UserError(f"--data: {path} holds {data.dtype} values; token ids must be integers")
    return data


class TokenFile:
    """Random windows of a token-id file: a `.npy` array of integers (1-D stream, or 2-D rows read as one stream)."""

    def __init__(self, path: str | Path, vocab: int, seed: int = 0):
        path = Path(path)
        data = read_token_ids(path)
        stream = np.asarray(data).reshape(-1)
        if stream.size and (stream.min() < 0 or stream.max() >= vocab):
            raise UserError(
                f"--data: {path} has token ids in [{stream.min()}, {stream.max()}], outside the vocabulary [0, {vocab})"
            )
        self.stream = stream.astype(np.int32)
        self.path = path
        self.seed = seed

    def batch(self, step: int, batch: int, length: int) -> np.ndarray:
        if self.stream.size < length:
            raise UserError(f"--data: {self.path} has {self.stream.size} tokens, fewer than one window of {length}")
        starts = _rng(self.seed, step).integers(0, self.stream.size - length + 1, batch)
        return np.stack([self.stream[s : s + length] for s in starts])
