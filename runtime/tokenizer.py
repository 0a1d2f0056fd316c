"""Tokenizers for raw-text training: a Hugging Face `tokenizers` `tokenizer.json`, loaded, or trained here as a
byte-level BPE (GPT-2's scheme: every byte is in the alphabet, so no text is ever out of vocabulary).

The tokenizer must fit the model: ids at or beyond the embedding's rows would index past it, so a tokenizer larger
than the spec's `vocab` is refused before anything is compiled."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..frontend.errors import UserError
from .documents import TextDocuments

EOS = "<|endoftext|>"


def load_tokenizer(path: str | Path):
    """The `tokenizers.Tokenizer` of a `tokenizer.json`; anything else is a user error naming the file."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer: no such file: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exceptions on malformed JSON
        raise UserError(f"tokenizer {path}: not a Hugging Face tokenizer.json ({err})") from None


def check_fits(tokenizer, path: str | Path, vocab: int, eos: str) -> int:
    """The id of `eos`, after checking that every id the tokenizer makes is a row of the model's embedding."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab:
        raise UserError(f"tokenizer {path} has {size} tokens, more than the model's vocab ({vocab}): train one with "
                        f"`dsv3c tokenizer --vocab {vocab}` or raise the spec's vocab")
    eos_id = tokenizer.token_to_id(eos)
    if eos_id is None:
        raise UserError(f"tokenizer {path} has no token '{eos}' to end documents with (set eos in the data block)")
    return eos_id


def train_tokenizer(docs: TextDocuments, vocab: int, out: str | Path, min_frequency: int = 2) -> int:
    """Trains a byte-level BPE of at most `vocab` tokens (with `<|endoftext|>`) on `docs`, writes it to `out`
    atomically, and returns its size (smaller than `vocab` when the text has too few distinct pairs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab < len(alphabet) + 1:
        raise UserError(f"--vocab {vocab} is too small: a byte-level tokenizer needs {len(alphabet) + 1} tokens "
                        "(256 bytes and the end-of-text token) before any merge")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=min_frequency, special_tokens=[EOS],
                                  initial_alphabet=alphabet, show_progress=False)

    def texts() -> Iterator[str]:
        for i in range(len(docs)):
            yield docs[i]

    tokenizer.train_from_iterator(texts(), trainer=trainer, length=len(docs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(out)
    return tokenizer.get_vocab_size(with_added_tokens=True)
