"""Documents, bad-data accounting, packing, sharding and exact resume of the window stream."""

import json

import pytest

from qstar_rl.config import DataConfig
from qstar_rl.data import (
    DataError,
    DataPosition,
    DataStats,
    WindowStream,
    check_source,
    documents,
    shakespeare_documents,
)
from qstar_rl.loading import SMOLLM2, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOLLM2)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_shakespeare_corpus_is_clean_scenes():
    docs = shakespeare_documents()
    assert len(docs) > 700  # every scene of 38 plays
    assert docs[0].startswith("A Midsummer Night's Dream, ACT I, SCENE I")
    assert not any("**" in d for d in docs)
    assert sum(len(d) for d in docs) > 4_000_000


def test_bad_documents_are_skipped_and_counted(tmp_path, tokenizer):
    good = "The quick brown fox jumps over the lazy dog. " * 20
    lines = [
        json.dumps({"text": good}).encode(),
        json.dumps({"text": ""}).encode(),  # empty
        json.dumps({"text": "   \n "}).encode(),  # whitespace only
        json.dumps({"text": "Hi."}).encode(),  # too short
        json.dumps({"body": good}).encode(),  # missing field
        json.dumps({"text": 17}).encode(),  # not text
        b'{"text": "caf\xe9 \xff\xfe binary"}',  # undecodable bytes
        b"{not json at all",  # malformed
        json.dumps({"text": good + " again"}).encode(),
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    config = DataConfig(source=str(tmp_path / "a.jsonl"), seq_len=16, min_doc_tokens=8)
    stream = WindowStream(config, tokenizer, seed=0)
    windows = take(stream, 20)
    assert all(len(w) == 16 for w in windows)
    stats = stream.stats
    assert stats.documents == 2
    assert stats.skipped_empty == 2 and stats.skipped_too_short == 1
    assert stats.skipped_missing_field == 2 and stats.skipped_undecodable == 2
    assert stream.stats.as_metrics()["data/skipped_undecodable"] == 2


def test_txt_folder_and_parquet_sources(tmp_path, tokenizer):
    import datasets

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Alpha beta gamma delta epsilon zeta eta theta. " * 10)
    (tmp_path / "docs" / "b.txt").write_bytes(b"\xff\xfe\x00 not text")
    stats = DataStats()
    docs = list(documents(DataConfig(source=str(tmp_path / "docs")), stats, seed=0))
    assert len(docs) == 1 and stats.skipped_undecodable == 1
    datasets.Dataset.from_dict({"content": ["one document here", None, "two"]}).to_parquet(tmp_path / "p.parquet")
    stats = DataStats()
    config = DataConfig(source=str(tmp_path / "p.parquet"), text_field="content")
    assert sorted(documents(config, stats, seed=0)) == ["one document here", "two"]
    assert stats.skipped_missing_field == 1


def test_sharding_splits_the_single_rank_stream(tokenizer):
    config = DataConfig(source="shakespeare", seq_len=24)
    single = take(WindowStream(config, tokenizer, seed=3), 12)
    rank0 = take(WindowStream(config, tokenizer, seed=3, rank=0, world_size=2), 6)
    rank1 = take(WindowStream(config, tokenizer, seed=3, rank=1, world_size=2), 6)
    assert rank0 == single[0::2] and rank1 == single[1::2]
    other_seed = take(WindowStream(config, tokenizer, seed=4), 12)
    assert other_seed != single


def test_resume_continues_exactly(tokenizer):
    config = DataConfig(source="shakespeare", seq_len=24)
    straight = WindowStream(config, tokenizer, seed=1, rank=1, world_size=2)
    expected = take(straight.batches(3), 4)
    first = WindowStream(config, tokenizer, seed=1, rank=1, world_size=2)
    batches = first.batches(3)
    got = [next(batches) for _ in range(2)]
    saved = DataPosition(**vars(first.position))
    assert saved.windows == 2 * 3 * 2  # 2 batches of 3 windows on each of 2 ranks
    resumed = WindowStream(config, tokenizer, seed=1, rank=1, world_size=2, position=saved)
    got += take(resumed.batches(3), 2)
    for a, b in zip(expected, got, strict=True):
        assert a["input_ids"].tolist() == b["input_ids"].tolist()


def test_epochs_repeat_with_a_new_order(tmp_path, tokenizer):
    docs = [{"text": f"Document number {i} says something about the number {i} at length."} for i in range(6)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    stream = WindowStream(DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=8), tokenizer, seed=0)
    windows = take(stream, 40)
    assert stream.position.epoch >= 1 and all(len(w) == 8 for w in windows)


def test_too_small_a_source_is_a_clear_error(tmp_path, tokenizer):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "short but long enough to pass the filter of tokens"}))
    stream = WindowStream(DataConfig(source=str(tmp_path / "d.jsonl"), seq_len=512), tokenizer, seed=0)
    with pytest.raises(ValueError, match="fewer than the 1 ranks"):
        take(stream, 1)


def test_a_folder_with_a_bad_parquet_file_reads_the_good_ones_and_counts_the_bad(tmp_path, tokenizer, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in ("a", "c"):
        pq.write_table(
            pa.table({"text": [f"Document {name} says something long enough. " * 5]}), folder / f"{name}.parquet"
        )
    (folder / "b.parquet").write_bytes(b"PAR1 this is not parquet at all")
    stats = DataStats()
    docs = list(documents(DataConfig(source=str(folder)), stats, seed=0))
    assert sorted(d[:10] for d in docs) == ["Document a", "Document c"]
    assert stats.skipped_bad_files == 1
    assert "b.parquet, not a readable parquet file" in caplog.text


def test_json_nested_too_deep_to_parse_is_a_skipped_record(tmp_path):
    path = tmp_path / "deep.jsonl"
    good = json.dumps({"text": "fine " * 20})
    path.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n" + good + "\n")
    stats = DataStats()
    assert len(list(documents(DataConfig(source=str(path)), stats, seed=0))) == 2
    assert stats.skipped_undecodable == 1


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00garbage\n{broken\n", b'{"text": "Hi"}\n'])
def test_a_source_without_a_single_window_is_a_data_error_naming_what_was_skipped(tmp_path, tokenizer, content):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        check_source(DataConfig(source=str(path), seq_len=24), tokenizer, seed=0, world_size=2)
    message = str(err.value)
    assert f"data.source {str(path)!r} yields 0 windows of 24 tokens per epoch, fewer than the 2 ranks" in message
    assert "documents and files seen: " in message
