"""Evaluation: the paper's answer probability (by hand and against a slow reference), answer extraction,
task loaders on local files with the hub's fields, and `qstar-rl eval` on SmolLM2-135M offline."""

import json
import math

import pytest
import torch
from conftest import make_model
from reference import reference_next_logits

from qstar_rl.core.mixing import restricted_token_logprobs
from qstar_rl.eval import (
    EvalItem,
    answer_logprobs,
    answer_vocabulary,
    extract_answer,
    is_correct,
    load_task,
)


def test_answer_probability_on_a_hand_made_example():
    # Vocabulary of 6; the valid answer tokens are 1, 2 and 4; the answer is the two tokens [2, 4].
    allowed = torch.tensor([1, 2, 4])
    step1 = torch.tensor([1.0, 1.0, 2.0, 3.0, 4.0, 1.0]).log()  # unnormalised probabilities, sum 12
    step2 = torch.tensor([5.0, 1.0, 1.0, 1.0, 2.0, 2.0]).log()  # sum 12
    logits, answer = torch.stack([step1, step2]), torch.tensor([2, 4])
    restricted = restricted_token_logprobs(logits, answer, allowed).sum().exp()
    # By hand: step 1, p(2) among {1, 2, 4} = 2 / (1 + 2 + 4); step 2, p(4) among them = 2 / (1 + 1 + 2).
    assert restricted.item() == pytest.approx(2 / 7 * 2 / 4)
    full = logits.log_softmax(-1).gather(1, answer[:, None]).sum().exp()
    assert full.item() == pytest.approx(2 / 12 * 2 / 12)  # the unrestricted metric, for contrast
    assert restricted_token_logprobs(step1, torch.tensor(3), allowed) == -math.inf  # 3 is not a valid answer


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("think", [True, False])
def test_teacher_forced_answer_logprobs_equal_the_slow_reference(family, think):
    torch.manual_seed(0)
    model = make_model(family, length=3).eval()
    vocab = model.lm.config.vocab_size
    prompts = [torch.randint(1, vocab, (n,)).tolist() for n in (7, 4, 9)]  # ragged: left padding
    answers = [torch.randint(1, vocab, (n,)).tolist() for n in (3, 1, 2)]  # ragged answers
    allowed = torch.tensor(sorted({t for a in answers for t in a} | {3, 10, 50}))
    with torch.no_grad():
        full, restricted = answer_logprobs(model, prompts, answers, allowed, think, pad_id=0)
        for b, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            text, want_full, want_restricted = torch.tensor(prompt), 0.0, 0.0
            for token in answer:
                logits, _, _ = reference_next_logits(model, text, think)
                want_full += logits.log_softmax(-1)[token].item()
                want_restricted += (logits[allowed].log_softmax(-1)[allowed.tolist().index(token)]).item()
                text = torch.cat([text, torch.tensor([token])])
            assert full[b].item() == pytest.approx(want_full, abs=1e-4)
            assert restricted[b].item() == pytest.approx(want_restricted, abs=1e-4)
            assert restricted[b] > full[b]  # restricting to fewer tokens can only raise the probability


def test_answer_vocabularies_and_answer_extraction():
    from qstar_rl.model import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m")
    numeric = answer_vocabulary(tokenizer, [EvalItem("q", "288"), EvalItem("q", "-1,200")])
    pieces = {tokenizer.decode([t]) for t in numeric.tolist()}
    assert {" ", "0", "9", " -", ",", "."} <= pieces and not {" the", "A", "\n"} & pieces
    assert set(tokenizer.encode(" 288", add_special_tokens=False)) <= set(numeric.tolist())
    choices = [("A", "cat"), ("B", "dog"), ("C", "eel")]
    labels = answer_vocabulary(tokenizer, [EvalItem("q", "B", choices)])
    assert {tokenizer.decode([t]) for t in labels.tolist()} == {" A", " B", " C"}
    assert answer_vocabulary(tokenizer, [EvalItem("q", "Paris")]) is None  # free text: the whole vocabulary

    assert extract_answer(EvalItem("q", "1200"), " 1,200 apples, then 5") == "1200"
    assert is_correct(EvalItem("q", "-4"), " -4.0\n") and not is_correct(EvalItem("q", "4"), " 14")
    assert is_correct(EvalItem("q", "B", choices), " B. dog") and not is_correct(EvalItem("q", "B", choices), " A")
    assert is_correct(EvalItem("q", "Paris"), " paris.\nMore text")


def test_gsm8k_and_commonsenseqa_loaders_read_local_files_with_the_hubs_fields(tmp_path):
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(
        json.dumps({"question": "Tom has 3 apples and buys 1,000 more. How many?", "answer": "3+1000\n#### 1,003"})
        + "\n"
        + json.dumps({"question": "2 + 2?", "answer": "It is 4.\n#### 4"})
        + "\n"
    )
    items = load_task("gsm8k", data_file=str(gsm))
    assert [(i.answer, i.choices) for i in items] == [("1003", []), ("4", [])]
    csqa = tmp_path / "csqa.jsonl"
    record = {
        "id": "x",
        "question": "Where do fish live?",
        "question_concept": "fish",
        "choices": {"label": ["A", "B"], "text": ["water", "desert"]},
        "answerKey": "A",
    }
    csqa.write_text(json.dumps(record) + "\n")
    (item,) = load_task("commonsenseqa", limit=5, data_file=str(csqa))
    assert item.answer == "A" and item.choices == [("A", "water"), ("B", "desert")]


def test_reasoning_gym_tasks_are_generated_offline_and_unknown_tasks_are_refused():
    items = load_task("gsm_symbolic", limit=3, seed=7)
    assert len(items) == 3 and all(i.question and float(i.answer) == float(i.answer) for i in items)
    assert [i.question for i in load_task("gsm_symbolic", limit=3, seed=7)] == [i.question for i in items]
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'.*gsm_symbolic"):
        load_task("gsm9k")


def test_the_eval_command_explains_a_hub_it_cannot_reach(monkeypatch, capsys):
    from qstar_rl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["eval", "--task", "gsm8k", "--limit", "2"]) == 2
    assert "--data FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_smollm2_on_20_gsm_symbolic_items_runs_offline_and_writes_results(tmp_path, monkeypatch):
    from qstar_rl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "result.json"
    args = ["eval", "--checkpoint", "smollm2-135m", "--task", "gsm_symbolic", "--limit", "20"]
    assert main([*args, "--thought-length", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["items"] == 20 and len(result["records"]) == 20
    metrics = result["metrics"]
    for name in ("answer_prob", "answer_prob_full", "exact_match"):
        assert 0 <= metrics[name] <= 1 and 0 <= metrics[f"{name}_no_think"] <= 1
    assert 0 < metrics["answer_prob_full"] < metrics["answer_prob"]  # restriction raises the probability
    # Untrained thinking parts (mixing weight exactly 0) predict exactly what the base model predicts.
    assert metrics["answer_prob"] == metrics["answer_prob_no_think"]
    assert all(r["generated"] == r["generated_no_think"] for r in result["records"])
