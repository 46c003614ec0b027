import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rsavq import data
from rsavq.data import (
    Corpus,
    calibration_windows,
    evaluation_windows,
    load_corpus,
    tokenize,
    wikitext_rows,
)
from rsavq.errors import DataError

DOCS = ["first document about foxes.", "second one, about dogs.", "third: bridges & rivers."]


@pytest.fixture()
def no_hub(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable (test)")

    monkeypatch.setattr(data, "_hub_load", offline)


def test_wikitext_rows_rebuild_hf_rows():
    raw = " \n = Title = \n \n Some text here . \n \n"
    rows = wikitext_rows(raw)
    assert rows == ["", " = Title = \n", "", " Some text here . \n", ""]
    assert "".join(r or " \n" for r in rows) == raw


def test_wikitext_local_file_matches_protocol(shared_data):
    corpus = load_corpus("wikitext2", shared_data)
    raw = (shared_data / "wikitext2" / "wiki.test.raw").read_text()
    assert corpus.name == "wikitext2:test"
    assert corpus.text() == "\n\n".join(wikitext_rows(raw))
    assert load_corpus("wikitext2:valid", shared_data).name == "wikitext2:validation"


def test_c4_jsonl_and_parquet_agree(shared_data):
    corpus = load_corpus("c4", shared_data)
    assert corpus.name == "c4:validation" and corpus.shuffle and len(corpus.documents) == 2000
    parquet = data.read_documents(shared_data / "c4" / "c4_validation_2k.parquet")
    assert parquet == list(corpus.documents)


def test_data_dir_from_environment(monkeypatch, shared_data):
    monkeypatch.setenv("RSAVQ_DATA_DIR", str(shared_data))
    assert load_corpus("wikitext2").name == "wikitext2:test"


def test_txt_jsonl_gz_parquet(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    (tmp_path / "b.jsonl").write_text(lines)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write(lines)
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "d.parquet")
    assert load_corpus(str(tmp_path / "a.txt")).documents == ("plain text",)
    for name in ("b.jsonl", "c.jsonl.gz", "d.parquet"):
        corpus = load_corpus(str(tmp_path / name))
        assert corpus.documents == tuple(DOCS)
        assert corpus.text() == "\n\n".join(DOCS)


def test_jsonl_other_field_and_missing_field(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    assert load_corpus(str(path), text_field="body").documents == ("x",)
    with pytest.raises(DataError, match=r"q.jsonl:1: no 'text' field; pick one with --text-field"):
        load_corpus(str(path))


def test_bad_json_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2: not valid JSON"):
        load_corpus(str(path))


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'wikitext3'; use one of wikitext2, c4"):
        load_corpus("wikitext3")
    with pytest.raises(DataError, match="not found; check the path"):
        load_corpus(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_corpus("wikitext2:dev")


def test_named_source_not_found_lists_what_was_tried(tmp_path, no_hub):
    with pytest.raises(DataError) as info:
        load_corpus("ptb", tmp_path)
    message = str(info.value)
    assert "dataset ptb:test not found" in message
    assert f"nothing matching ptb/ptb.test.txt in {tmp_path}" in message
    assert "hub: ConnectionError: hub unreachable" in message
    assert "--data-dir" in message


def test_local_ptb(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" a b c \n d e f \n")
    corpus = load_corpus("ptb", tmp_path)
    assert corpus.text() == "a b c d e f"


def test_evaluation_windows_are_consecutive_tokens(tiny_tokenizer, text_file):
    corpus = load_corpus(str(text_file))
    ids = tokenize(tiny_tokenizer, corpus.text())
    windows = evaluation_windows(tiny_tokenizer, corpus, 64)
    assert windows.shape == (ids.numel() // 64, 64)
    assert torch.equal(windows.flatten(), ids[: windows.numel()])
    assert evaluation_windows(tiny_tokenizer, corpus, 64, limit=3).shape == (3, 64)


def test_text_shorter_than_one_window(tiny_tokenizer):
    corpus = Corpus("short", ("too short",))
    with pytest.raises(DataError, match="fewer than one window of 2048; lower --seqlen"):
        evaluation_windows(tiny_tokenizer, corpus, 2048)


def test_calibration_windows_seeded_distinct_and_from_corpus(tiny_tokenizer, text_file):
    corpus = load_corpus(str(text_file))
    ids = tokenize(tiny_tokenizer, corpus.text())
    a = calibration_windows(tiny_tokenizer, corpus, 8, 32, seed=0)
    b = calibration_windows(tiny_tokenizer, corpus, 8, 32, seed=0)
    c = calibration_windows(tiny_tokenizer, corpus, 8, 32, seed=1)
    assert a.shape == (8, 32) and torch.equal(a, b) and not torch.equal(a, c)
    slots = ids[: ids.numel() // 32 * 32].view(-1, 32)
    matches = [(slots == row).all(dim=1).nonzero().flatten().tolist() for row in a]
    assert all(len(m) >= 1 for m in matches)
    assert len({m[0] for m in matches}) == 8  # distinct, non-overlapping windows


def test_calibration_shuffles_web_documents(tiny_tokenizer):
    docs = tuple(f"document number {i} " * 20 for i in range(50))
    corpus = Corpus("web", docs, shuffle=True)
    first = calibration_windows(tiny_tokenizer, corpus, 4, 16, seed=0)
    assert torch.equal(first, calibration_windows(tiny_tokenizer, corpus, 4, 16, seed=0))


def test_calibration_needs_enough_tokens(tiny_tokenizer):
    corpus = Corpus("small", ("a few words only",))
    with pytest.raises(DataError, match="fewer than 4 windows of 64; lower --nsamples/--seqlen"):
        calibration_windows(tiny_tokenizer, corpus, 4, 64)


def test_heldout_windows_come_from_documents_calibration_never_reads(tiny_tokenizer):
    from helpers import WORDS
    from rsavq.data import Corpus, calibration_windows, heldout_windows

    words = sorted(set(WORDS))  # one distinct word per document
    corpus = Corpus("docs", tuple(" ".join([w] * 30) for w in words), shuffle=True)
    calib = calibration_windows(tiny_tokenizer, corpus, 4, 16, seed=3)
    held = heldout_windows(tiny_tokenizer, corpus, 4, 16, seed=3, count=2)
    assert held.shape == (2, 16)
    seen = lambda windows: {w for x in windows for w in tiny_tokenizer.decode(x).split()}  # noqa: E731
    assert seen(held) and not seen(held) & seen(calib)
    with pytest.raises(DataError, match="held-out windows"):
        heldout_windows(tiny_tokenizer, corpus, 4, 16, seed=3, count=500)


def test_unread_documents_skip_what_a_calibration_of_that_size_reads(tiny_tokenizer):
    from helpers import WORDS
    from rsavq.data import Corpus, calibration_windows, unread_documents

    words = sorted(set(WORDS))
    corpus = Corpus("docs", tuple(" ".join([w] * 30) for w in words), shuffle=True)
    rest = unread_documents(tiny_tokenizer, corpus, 4 * 16, seed=3)
    assert 0 < len(rest) < len(words)
    calib = calibration_windows(tiny_tokenizer, corpus, 4, 16, seed=3)
    read = {w for x in calib for w in tiny_tokenizer.decode(x).split()}
    assert not read & {doc.split()[0] for doc in rest}
    assert unread_documents(tiny_tokenizer, corpus, 10**6, seed=3) == []
