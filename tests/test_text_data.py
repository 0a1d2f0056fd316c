"""Training on real text through Grain and a tokenizer: Python's own standard library is the corpus (every machine
with Python has it; nothing is downloaded).

Checked against independent facts: a stream resumed from `get_state` (through JSON) continues with exactly the
batches of an uninterrupted one; every document start is marked and predicted from nothing across the boundary;
processes read disjoint documents; a model trained on the text lowers its held-out loss, and a run resumed from its
checkpoint mid-epoch has the uninterrupted run's losses bit for bit.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import dsv3c
from dsv3c.cli import main
from dsv3c.frontend.spec import DataSpec
from dsv3c.runtime.documents import TextDocuments, TokenDocuments, expand
from dsv3c.runtime.evaluate import held_out_loss
from dsv3c.runtime.loop import train
from dsv3c.runtime.text_data import open_data, resolve
from dsv3c.runtime.tokenizer import load_tokenizer

STDLIB = Path(sysconfig.get_path("stdlib"))
CORPUS = str(STDLIB / "json" / "*.py") + "," + str(STDLIB / "textwrap.py") + "," + str(STDLIB / "string.py")
VOCAB = 320


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    assert main(["tokenizer", CORPUS, "-o", str(path), "--vocab", str(VOCAB)]) == 0
    return path


def _data(tokenizer: Path, **fields) -> DataSpec:
    return resolve(DataSpec(), ".", text=CORPUS, tokenizer=str(tokenizer), **fields)


def test_tokenizer_round_trips_the_text(tokenizer):
    tok = load_tokenizer(tokenizer)
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id("<|endoftext|>") is not None
    text = (STDLIB / "textwrap.py").read_text()
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text and len(ids) < 0.7 * len(text.encode())  # 63 merges already compress


def test_resumed_stream_gives_the_uninterrupted_batches(tokenizer):
    data = _data(tokenizer)
    whole = open_data(data, VOCAB, batch=2, seq=32, seed=3, shard=(0, 1))
    expected = [whole.batch(s, 2, 33) for s in range(9)]
    first = open_data(data, VOCAB, batch=2, seq=32, seed=3, shard=(0, 1))
    for s in range(4):
        np.testing.assert_array_equal(first.batch(s, 2, 33), expected[s])
    state = json.loads(json.dumps(first.get_state()))
    resumed = open_data(data, VOCAB, batch=2, seq=32, seed=3, shard=(0, 1))
    resumed.set_state(state)
    for s in range(4, 9):
        np.testing.assert_array_equal(resumed.batch(s, 2, 33), expected[s])
    # still mid-epoch: the 9 batches hold fewer tokens than the training documents
    docs = TextDocuments(expand(CORPUS, "corpus"))
    assert 9 * 2 * 33 < sum(len(docs[i]) for i in range(len(docs))) / 4
    other = open_data(data, VOCAB, batch=2, seq=32, seed=4, shard=(0, 1))
    with pytest.raises(dsv3c.UserError, match="for another data set"):
        other.set_state(state)
    assert not np.array_equal(other.batch(0, 2, 33), expected[0])  # the seed shuffles


def test_document_starts_are_marked_after_each_end(tokenizer, tmp_path):
    eos = load_tokenizer(tokenizer).token_to_id("<|endoftext|>")
    # many short documents: the paragraphs of textwrap.py, one a JSON line
    paragraphs = [p for p in (STDLIB / "textwrap.py").read_text().split("\n\n") if p.strip()]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    data = resolve(DataSpec(), ".", text=str(tmp_path / "p.jsonl"), tokenizer=str(tokenizer))
    stream = open_data(data, VOCAB, batch=4, seq=64, seed=0, shard=(0, 1))
    rows = np.concatenate([stream.batch(s, 4, 65) for s in range(10)])
    starts = rows < 0
    ids = np.where(starts, -rows - 1, rows)
    after_eos = np.zeros_like(starts)
    after_eos[:, 1:] = ids[:, :-1] == eos
    np.testing.assert_array_equal(starts, after_eos)  # a document starts exactly after a document's end
    assert starts.sum() >= 8 and ids.max() < VOCAB


def test_processes_read_disjoint_documents(tmp_path):
    # token shards whose documents are recognisable: document d is (d + 1) repeated, then the separator 0
    stream = np.concatenate([np.r_[np.full(5 + d % 3, d + 1), 0] for d in range(40)]).astype(np.uint16)
    stream.tofile(tmp_path / "a.bin")
    data = resolve(DataSpec(), ".", tokens=str(tmp_path / "*.bin"), eos_id=0, eval_fraction=0.0)
    seen = []
    for index in range(2):
        shard = open_data(data, 64, batch=4, seq=15, seed=0, shard=(index, 2))
        rows = np.concatenate([shard.batch(s, 4, 16) for s in range(4)])
        ids = np.where(rows < 0, -rows - 1, rows)
        seen.append({int(t) - 1 for t in ids.ravel() if t > 0})  # the documents, by number
    assert len(seen[0]) > 5 and len(seen[1]) > 5
    assert all(d % 2 == 0 for d in seen[0]) and all(d % 2 == 1 for d in seen[1])  # every other document each


def test_token_files_and_bad_input(tmp_path, tokenizer):
    np.save(tmp_path / "a.npy", np.arange(20, dtype=np.int32))
    docs = TokenDocuments(expand(str(tmp_path / "a.npy"), "t"), vocab=32, piece=8)
    assert [len(docs[i]) for i in range(len(docs))] == [8, 8, 4]
    with pytest.raises(dsv3c.UserError, match=r"token ids in \[0, 19\], outside the vocabulary \[0, 10\)"):
        TokenDocuments(expand(str(tmp_path / "a.npy"), "t"), vocab=10)
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(dsv3c.UserError, match="not a whole number of uint16"):
        TokenDocuments(expand(str(tmp_path / "odd.bin"), "t"), vocab=10)
    with pytest.raises(dsv3c.UserError, match="no file matches"):
        expand(str(tmp_path / "*.none"), "--text")
    with pytest.raises(dsv3c.UserError, match=r"has 320 tokens, more than the model's vocab \(256\)"):
        open_data(_data(tokenizer), 256, batch=2, seq=8, seed=0, shard=(0, 1))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(dsv3c.UserError, match="not a Hugging Face tokenizer.json"):
        open_data(_data(tmp_path / "bad.json"), 512, batch=2, seq=8, seed=0, shard=(0, 1))
    with pytest.raises(dsv3c.UserError, match="does not divide over 2 processes"):
        open_data(_data(tokenizer), VOCAB, batch=3, seq=8, seed=0, shard=(0, 2))
    (tmp_path / "docs.jsonl").write_text('{"text": "a"}\n\n{"body": "b"}\n')
    jsonl = TextDocuments([tmp_path / "docs.jsonl"])
    assert len(jsonl) == 2 and jsonl[0] == "a"
    with pytest.raises(dsv3c.UserError, match="no string field 'text'"):
        jsonl[1]
    assert main(["tokenizer", CORPUS, "-o", str(tmp_path / "t.json"), "--vocab", "100"]) == 2
    assert not (tmp_path / "t.json").exists()


def test_array_record_documents(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "docs.array_record"), "group_size:1")
    for text in ("héllo", "wörld", "!"):
        writer.write(text.encode())
    writer.close()
    docs = TextDocuments(expand(str(tmp_path / "*.array_record"), "--text"))
    assert [docs[i] for i in range(len(docs))] == ["héllo", "wörld", "!"]


def test_data_block_in_the_spec(tmp_path):
    text = (Path(dsv3c.__file__).parents[1] / "examples" / "tiny-text.dsv3").read_text()
    spec = dsv3c.parse(text.replace("data {", 'data { text "corpus/*.txt", tokenizer "tok.json",'))
    assert spec.data == DataSpec(text="corpus/*.txt", tokenizer="tok.json", eval_fraction=0.1, eval_every=25,
                                 eval_batches=4)
    resolved = resolve(spec.data, "/runs/a", eval_every=5)
    assert (resolved.text, resolved.tokenizer, resolved.eval_every) == ("/runs/a/corpus/*.txt", "/runs/a/tok.json", 5)
    bad = text.replace("eval_every 25", "eval_every -1")
    with pytest.raises(dsv3c.SpecError, match=r"'eval_every' must be non-negative, got -1") as info:
        dsv3c.parse(bad)
    at = bad.index("-1")
    assert (info.value.line, info.value.col) == (bad[:at].count("\n") + 1, at - bad.rindex("\n", 0, at))
    with pytest.raises(dsv3c.SpecError, match="unknown key 'tokenz' in data block"):
        dsv3c.parse(text.replace("data {", 'data { tokenz "x",'))


SMALL = """
model small { vocab 320, dim 32, layers 1, attention mla { heads 2, q_lora_rank 0, kv_lora_rank 16,
  head_dim { nope 8, rope 4, v 8 } }, ffn dense { hidden 64 }, dtype { params f32, compute f32 } }
train { optimizer adamw { lr 1e-2, weight_decay 0.0 }, schedule constant { warmup 5 } }
"""


def test_model_learns_the_text_and_resumes_mid_epoch(tokenizer, tmp_path):
    prog = dsv3c.prepare(dsv3c.parse(SMALL), batch=8, seq=32, steps=40, pipeline="")  # no passes: a quick compile
    data = _data(tokenizer, eval_every=10, eval_batches=2, eval_fraction=0.3)

    def stream():
        return open_data(data, VOCAB, batch=8, seq=32, seed=0, shard=(0, 1))

    run = stream()
    evaluate = held_out_loss(prog, run.held_out)
    untrained = evaluate(prog.init_state(0))["eval_loss"]
    whole = train(prog, 40, run, evaluate=evaluate, eval_every=10)
    evals = [m["eval_loss"] for _, m in whole.evals]
    # an untrained model is near uniform over the vocabulary; trained, it predicts held-out text far better
    assert abs(untrained - np.log(VOCAB)) < 0.3 and len(evals) == 4 and evals[-1] < untrained - 0.8, evals
    assert np.isclose(whole.evals[-1][1]["eval_ppl"], np.exp(evals[-1]))

    ckpt = tmp_path / "ckpt"
    train(prog, 40, stream(), ckpt=ckpt, save_every=7, stop_after=14)
    resumed = train(prog, 40, stream(), ckpt=ckpt, resume=True)
    assert resumed.steps[0] == 15
    assert resumed.losses() == whole.losses()[14:]
