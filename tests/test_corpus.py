"""The offline corpora: the math splits and their leakage check, the Wikipedia sample, and their data sources."""

import importlib.util
import re

import pytest

from qstar_rl import corpus
from qstar_rl.checks import run_problems
from qstar_rl.config import load_config
from qstar_rl.corpus import (
    HELDOUT_ITEMS_PER_TASK,
    MATH_TASKS,
    TRAIN_ITEMS_PER_TASK,
    corpus_documents,
    leakage_report,
    math_documents,
    math_documents_by_task,
    strip_wikitext,
    task_documents,
    wiki_documents,
)
from qstar_rl.data import DataStats, WindowStream, documents
from qstar_rl.loading import SMOLLM2, load_tokenizer


@pytest.fixture(scope="module")
def default_split():
    return (
        math_documents_by_task("train", TRAIN_ITEMS_PER_TASK),
        math_documents_by_task("heldout", HELDOUT_ITEMS_PER_TASK),
    )


def question(doc):
    return doc.partition("\nAnswer: ")[0]


def test_math_documents_are_deterministic_worked_problems():
    docs = math_documents("heldout", 10)
    assert docs == math_documents("heldout", 10)
    assert docs != math_documents("heldout", 10, seed=1)
    assert all(d.startswith("Question: ") and "\nAnswer: " in d and d.endswith("\n") for d in docs)
    gsm = task_documents("gsm_symbolic", "train", 5)
    assert all("#### " in d for d in gsm)  # worked steps, ending in the final answer
    assert not any("Do not include units" in d for d in gsm)  # reasoning-gym's grading instruction is dropped
    with pytest.raises(ValueError, match="split"):
        math_documents("test", 1)


def test_default_split_is_disjoint_and_gsm_templates_do_not_leak(default_split):
    train, heldout = default_split
    assert list(train) == list(MATH_TASKS)
    assert sum(map(len, train.values())) == len(MATH_TASKS) * TRAIN_ITEMS_PER_TASK
    assert 300 <= sum(map(len, heldout.values())) <= len(MATH_TASKS) * HELDOUT_ITEMS_PER_TASK
    for task in MATH_TASKS:
        assert not {question(d) for d in train[task]} & {question(d) for d in heldout[task]}, task
        assert len({question(d) for d in heldout[task]}) == len(heldout[task]), task
    # Measured: 0 of 50 held-out gsm_symbolic documents share a numbers-normalised 8-gram with training.
    report = leakage_report(train["gsm_symbolic"], heldout["gsm_symbolic"])
    assert report["heldout_documents"] == HELDOUT_ITEMS_PER_TASK
    assert report["leaked_documents"] == 0 and report["shared_ngrams"] == 0, report


def test_leakage_report_detects_leaky_splits(default_split):
    train, _ = default_split
    same = math_documents("train", 5)  # one seed on both sides
    report = leakage_report(same, same)
    assert report["leaked_documents"] == len(same) - report["unchecked_documents"]
    assert leakage_report(train["gsm_symbolic"], train["gsm_symbolic"][:50])["leaked_fraction"] == 1.0
    # gsm_symbolic from the training templates with other seeds: new names and numbers, the same problems
    other_items = task_documents("gsm_symbolic", "train", 40, seed=7)
    assert not {question(d) for d in other_items} & {question(d) for d in train["gsm_symbolic"]}
    assert leakage_report(train["gsm_symbolic"], other_items)["leaked_fraction"] > 0.9
    assert leakage_report(["one two three"], ["one two three"])["leaked_documents"] == 0  # shorter than n


def test_wikitext_is_stripped_to_prose():
    text = (
        "{{Infobox|a={{nested|x}}}}'''Bold''' [[Target page|shown]] and [[plain]]s.<ref name=a/>"
        "<ref>cite {{cite web|url=x}}</ref> [[File:x.jpg|thumb|caption with [[a link]] [and] more]]"
        "[http://example.org label]<!-- hidden -->\n== Heading ==\n{|\n| cell {{t}}\n|}\n"
        "* item &amp; more\n[[Category:Things]]\n== References ==\n{{reflist}}\nlinks"
    )
    assert strip_wikitext(text) == "Bold shown and plains. label\nHeading\nitem & more"


def test_wiki_documents_are_prose_articles():
    docs = wiki_documents()
    assert len(docs) > 90 and all(len(d) >= corpus.WIKI_MIN_CHARS for d in docs)
    assert docs[0].startswith("Anarchism\n\nAnarchism is a political philosophy")
    for residue in ("{{", "}}", "[[", "]]", "<ref", "'''", "thumb|", "&amp;"):
        assert not any(residue in d for d in docs), residue
    assert wiki_documents(limit=3) == docs[:3]


def test_missing_gensim_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps gensim==4.4.0")):
        wiki_documents()


def test_math_source_feeds_the_window_stream():
    config = load_config(None, ["data.source=math", "data.seq_len=64"])
    assert not [p for p in run_problems(config) if p.startswith("data.")]
    stream = WindowStream(config.data, load_tokenizer(SMOLLM2), seed=0)
    windows = iter(stream)
    first = [next(windows) for _ in range(4)]
    assert all(len(w) == 64 for w in first)
    assert "Question:" in stream.tokenizer.decode([t for w in first for t in w])
    assert corpus_documents("math") == corpus_documents("math")  # a fresh copy each time, the same documents
    shuffled = list(documents(config.data, DataStats(), seed=0))
    assert sorted(shuffled) == sorted(corpus_documents("math")) and shuffled != corpus_documents("math")


def test_other_source_names_keep_their_readers(monkeypatch):
    assert corpus_documents("maths") is None and corpus_documents("shakespeare") is None
    for source in ("math-heldout", "wiki-heldout"):
        assert not [p for p in run_problems(load_config(None, [f"data.source={source}"])) if p.startswith("data.")]
    problems = run_problems(load_config(None, ["data.source=math.jsonl"]))
    assert "data.source: no such file or folder math.jsonl" in problems

    def offline_hub(config, stats, seed):
        raise ConnectionError(f"Couldn't reach {config.source!r} on the Hub")

    monkeypatch.setattr("qstar_rl.data._hub_documents", offline_hub)
    with pytest.raises(ConnectionError, match="'maths'"):
        next(documents(load_config(None, ["data.source=maths"]).data, DataStats(), seed=0))
