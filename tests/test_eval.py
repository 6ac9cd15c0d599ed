"""Evaluation: the answer probability of both protocols (by hand and against a slow reference), the paper
protocol's joint tokenisation, answer extraction, task loaders on local files with the hub's fields, and
`qstar-rl eval` offline (tiny model, SmolLM2-135M)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import transformers
from conftest import make_model, randomise_thinking_parts
from reference import reference_next_logits

from qstar_rl.config import EvalConfig, ThoughtConfig, load_config, validate
from qstar_rl.core.mixing import restricted_token_logprobs
from qstar_rl.eval import (
    EvalItem,
    answer_logprobs,
    answer_vocabulary,
    extract_answer,
    is_correct,
    load_task,
    paper_answers,
    paper_prompt_text,
    periodic_eval,
    split_joint,
)
from qstar_rl.generate import load_for_generation
from qstar_rl.loading import load_tokenizer, tiny_lm
from qstar_rl.model import ThinkingLM


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer("smollm2-135m")


def sentencepiece_style_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A small BPE tokenizer with Llama-2 / Mistral's SentencePiece conventions, trained here: every string
    gets a "▁" prepended and spaces become "▁" (so " 72" alone starts with two), pieces start at a "▁",
    digits are single tokens, newlines are separate, and a BOS token comes first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("▁", behavior="merged_with_next"),
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    corpus = [
        "Q: How many apples does Tom have?\nA: 72\n",
        "Q: Where do fish live?\n(A) water\n(B) desert\nA: B\n",
        "A: A\nA: B\nA: C\nA: D\nA: E\nA: -1,200 and 0123456789 numbers 12 345 6789",
    ]
    tok.train_from_iterator(corpus * 3, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
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
    from qstar_rl.loading import load_tokenizer

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


def test_the_eval_command_explains_a_hub_it_cannot_reach():
    # A subprocess: `datasets` reads HF_DATASETS_OFFLINE at import, which an earlier test may have done; online
    # it would retry an unreachable hub for ~20 s instead of failing at once.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "qstar_rl.cli", "eval", "--task", "gsm8k", "--limit", "2"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--data FILE" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_eval_of_smollm2_on_8_gsm_symbolic_items_runs_offline_and_writes_results(tmp_path, monkeypatch):
    from qstar_rl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "result.json"
    args = ["eval", "--checkpoint", "smollm2-135m", "--task", "gsm_symbolic", "--limit", "8"]
    assert main([*args, "--thought-length", "2", "--max-new-tokens", "6", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["items"] == 8 and len(result["records"]) == 8
    metrics = result["metrics"]
    for name in ("answer_prob", "answer_prob_full", "exact_match"):
        assert 0 <= metrics[name] <= 1 and 0 <= metrics[f"{name}_no_think"] <= 1
    assert 0 < metrics["answer_prob_full"] < metrics["answer_prob"]  # restriction raises the probability
    # Untrained thinking parts (mixing weight exactly 0) predict exactly what the base model predicts.
    assert metrics["answer_prob"] == metrics["answer_prob_no_think"]
    assert all(r["generated"] == r["generated_no_think"] for r in result["records"])


# ---- the paper protocol ------------------------------------------------------------------------------


def bigram_lm(tokenizer, tables: dict[str, dict[str, float]]) -> ThinkingLM:
    """A real one-layer Llama whose next-token distribution depends on the last token only: p(next | last)
    is proportional to tables[last][next] (1 for every token a table does not name; one table "" for every
    token without a table). Attention and MLP outputs are zeroed, so the last hidden state is the last
    token's embedding, a one-hot e_j; RMSNorm (eps 0, hidden 16) makes it 4 e_j; the LM head's column j
    holds log(q) / 4. Its thinking parts are untrained (mixing weight 0), so thinking changes nothing."""
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        rms_norm_eps=0.0,
        tie_word_embeddings=False,
    )
    lm = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        lm.model.layers[0].self_attn.o_proj.weight.zero_()
        lm.model.layers[0].mlp.down_proj.weight.zero_()
        embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight  # (V, 16) each
        embedding.zero_()
        embedding[:, 0] = 1.0  # every token without a table: context 0
        head.zero_()  # q = 1 everywhere unless a table says otherwise
        for j, (last, table) in enumerate(tables.items()):
            if last:
                (token,) = tokenizer.encode(last, add_special_tokens=False)
                embedding[token] = 0.0
                embedding[token, j] = 1.0
            for word, q in table.items():
                (token,) = tokenizer.encode(word, add_special_tokens=False)
                head[token, j] = math.log(q) / 4
    return ThinkingLM(lm, ThoughtConfig(num_thoughts=2, length=2, talk_length=1), tokenizer=tokenizer).eval()


@pytest.mark.parametrize("think", [True, False])
def test_paper_protocol_answer_probability_on_a_hand_made_bigram_model(smollm2_tokenizer, think):
    tok = smollm2_tokenizer
    V = len(tok)
    digits = "0123456789"
    tables = {
        "": {},  # uniform
        ":": {" ": V},  # after "A:" the space is likely; it is read, never scored
        " ": {"1": 6, "2": 2, **{d: 0.5 for d in "03456789"}, "\n": 4},
        "1": {"2": 3, "\n": 2},
        "2": {"\n": 5},
    }
    model = bigram_lm(tok, tables)
    items = [EvalItem("x?", "12"), EvalItem("What is 3 - 5?", "-2")]
    forced = paper_answers(tok, items)
    assert [tok.decode(f.prompt[-1:]) for f in forced] == [" ", ":"]  # SmolLM2 writes " -" as one token
    assert [[tok.decode([t]) for t in f.answer] for f in forced] == [["1", "2", "\n"], [" -", "2", "\n"]]
    assert [f.scored for f in forced] == [[True, True, True], [False, True, True]]  # "-" is read, not scored
    assert sorted(tok.decode([t]) for t in forced[0].vocabulary.tolist()) == sorted([*digits, "\n"])
    full, restricted = answer_logprobs(
        model, [f.prompt for f in forced], [f.answer for f in forced], [f.vocabulary for f in forced], think,
        tok.pad_token_id, [f.scored for f in forced],
    )  # fmt: skip
    # By hand. "12": p("1" | " ") among the 10 digits and "\n" = 6 / (6 + 2 + 8 * 0.5 + 4), p("2" | "1") =
    # 3 / (3 + 2 + 9), and the closing newline p("\n" | "2") = 5 / (5 + 10); not the space after "A:".
    # Over the whole vocabulary the other V - 11 tokens add 1 each to the sums.
    assert restricted[0].exp().item() == pytest.approx(6 / 16 * 3 / 14 * 5 / 15, rel=1e-4)
    assert full[0].exp().item() == pytest.approx(6 / (V + 5) * 3 / (V + 3) * 5 / (V + 4), rel=1e-4)
    # "-2": " -" follows ":" (whose table favours the space: sum V - 1 + V) and only counts in the full
    # probability; "2" follows " -" (no table: uniform), then the newline as above.
    assert restricted[1].exp().item() == pytest.approx(1 / 11 * 5 / 15, rel=1e-4)
    assert full[1].exp().item() == pytest.approx(1 / (2 * V - 1) * 1 / V * 5 / (V + 4), rel=1e-4)


def test_joint_tokenisation_and_the_answer_span_smollm2_and_sentencepiece_style(smollm2_tokenizer):
    choices = [("A", "water"), ("B", "desert")]
    # SmolLM2 (byte-level BPE): the space after "A:" is a token of its own for numbers (context, not
    # scored), part of the label token for letters; and tokenising prompt and answer apart gives the same ids.
    tok = smollm2_tokenizer
    for item, answer_text in [
        (EvalItem("How many apples?", "72"), "72\n"),
        (EvalItem("x?", "-1,200"), " -1,200\n"),
        (EvalItem("Where do fish live?", "B", choices), " B\n"),
        (EvalItem("Capital of France?", "Paris"), " Paris\n"),
    ]:
        prompt = paper_prompt_text(item)
        context, answer = split_joint(tok, prompt, item.answer + "\n")
        joint = tok(prompt + item.answer + "\n").input_ids
        assert context + answer == joint and tok.decode(answer) == answer_text
        assert tok.decode(context) + answer_text == prompt + item.answer + "\n"
        assert tok.encode(prompt[:-1]) + tok.encode(" " + item.answer + "\n") == joint  # same ids apart
    assert paper_prompt_text(EvalItem("Where?", "B", choices)) == "Q: Where?\n(A) water\n(B) desert\nA: "

    # SentencePiece style (Llama-2, Mistral): apart, " 72" would read "▁", "▁", "7", "2" and " B" "▁", "▁B";
    # jointly the answer is "7", "2" after a "▁" of the context, and "▁B".
    sp = sentencepiece_style_tokenizer()
    for item, context_end, pieces, pieces_apart in [
        (EvalItem("How many apples?", "72"), ["A:", "▁"], ["7", "2", "\n"], ["▁", "▁", "7", "2", "\n"]),
        (EvalItem("Where do fish live?", "B", choices), ["\n", "A:"], ["▁B", "\n"], ["▁", "▁B", "\n"]),
    ]:
        prompt = paper_prompt_text(item)
        context, answer = split_joint(sp, prompt, item.answer + "\n")
        joint = sp(prompt + item.answer + "\n").input_ids
        assert context + answer == joint and sp.convert_ids_to_tokens(answer) == pieces
        assert sp.convert_ids_to_tokens([context[0], *context[-2:]]) == ["<s>", *context_end]
        apart = sp.encode(" " + item.answer + "\n", add_special_tokens=False)
        assert sp.convert_ids_to_tokens(apart) == pieces_apart  # what separate tokenisation would have scored
    forced = paper_answers(sp, [EvalItem("How many?", "72"), EvalItem("Where?", "B", choices)])
    assert sp.convert_ids_to_tokens(forced[0].prompt[-1:]) == ["▁"]  # the leading space token: read, not scored
    assert sorted(sp.convert_ids_to_tokens(forced[0].vocabulary.tolist())) == sorted([*"0123456789", "\n"])
    assert sorted(sp.convert_ids_to_tokens(forced[1].vocabulary.tolist())) == sorted(
        ["▁A", "▁B", "▁C", "▁D", "▁E", "\n"]
    )


def _reference_paper_logprobs(model, tok, item: EvalItem, think: bool) -> tuple[float, float]:
    """(full, restricted) log p of the answer under the paper protocol by plain no-cache forwards. The answer
    span is found independently of split_joint, as the authors do: by decoding growing prefixes of the
    joint tokens; the valid tokens are listed by hand."""
    prompt = paper_prompt_text(item)
    ids = tok(prompt + item.answer + "\n").input_ids
    first = next(i for i in range(len(ids)) if len(tok.decode(ids[: i + 1])) > len(prompt))
    newline = tok.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    if item.choices:
        allowed = [tok.convert_tokens_to_ids(f"Ġ{letter}") for letter in "ABCDE"] + [newline]
    elif item.answer.lstrip("-").replace(",", "").isdigit():
        allowed = [tok.convert_tokens_to_ids(d) for d in "0123456789"] + [newline]
    else:
        allowed = None
    full = restricted = 0.0
    for k in range(first, len(ids)):
        logits, _, _ = reference_next_logits(model, torch.tensor(ids[:k]), think)
        full += logits.log_softmax(-1)[ids[k]].item()
        if allowed is None:
            restricted += logits.log_softmax(-1)[ids[k]].item()
        elif ids[k] in allowed:
            restricted += logits[allowed].log_softmax(-1)[allowed.index(ids[k])].item()
    return full, restricted


@pytest.mark.parametrize("think", [True, False])
def test_paper_protocol_logprobs_equal_the_slow_reference(smollm2_tokenizer, think):
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    model = ThinkingLM(tiny_lm("llama", vocab_size=len(tok)), ThoughtConfig(2, 3, 2, init_token_id=5)).eval()
    randomise_thinking_parts(model)
    choices = [("A", "sea"), ("B", "sand"), ("C", "sky")]
    items = [  # ragged prompts and answers; numbers, a negative number, a choice, free text: per-item vocabularies
        EvalItem("Tom has 3 apples and buys 69 more. How many?", "72"),
        EvalItem("What is 3 - 8?", "-5"),
        EvalItem("Where do fish live?", "A", choices),
        EvalItem("Capital of France?", "Paris"),
    ]
    forced = paper_answers(tok, items)
    with torch.no_grad():
        full, restricted = answer_logprobs(
            model, [f.prompt for f in forced], [f.answer for f in forced], [f.vocabulary for f in forced], think,
            tok.pad_token_id, [f.scored for f in forced],
        )  # fmt: skip
        for b, item in enumerate(items):
            want_full, want_restricted = _reference_paper_logprobs(model, tok, item, think)
            assert full[b].item() == pytest.approx(want_full, abs=1e-4)
            assert restricted[b].item() == pytest.approx(want_restricted, abs=1e-4)
    assert restricted[3] == full[3] and all(restricted[:3] > full[:3])  # free text: no restriction


def test_a_bad_eval_protocol_is_a_listed_config_problem():
    problems = validate(load_config(None, ["eval.protocol=papers"]))
    assert "eval.protocol: must be one of default, paper, got 'papers'" in problems
    assert validate(load_config(None, ["eval.protocol=paper"])) == []


def test_the_eval_command_with_the_paper_protocol_end_to_end(tmp_path, monkeypatch):
    from qstar_rl.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["eval", "--checkpoint", "tiny-llama", "--task", "gsm_symbolic", "--limit", "3", "--thought-length", "2"]
    results = {}
    for protocol in ("paper", "default"):
        out = tmp_path / f"{protocol}.json"
        assert main([*args, "--max-new-tokens", "3", "--protocol", protocol, "--out", str(out)]) == 0
        results[protocol] = json.loads(out.read_text())
    paper = results["paper"]
    assert paper["protocol"] == "paper" and results["default"]["protocol"] == "default"
    assert paper["items"] == 3 and len(paper["records"]) == 3 and paper["thought"]["length"] == 2
    metrics = paper["metrics"]
    assert 0 < metrics["answer_prob_full"] < metrics["answer_prob"] <= 1 and 0 <= metrics["exact_match"] <= 1
    assert metrics["answer_prob"] == metrics["answer_prob_no_think"]  # untrained thinking parts: w = 0
    assert metrics["answer_prob"] != results["default"]["metrics"]["answer_prob"]  # another prompt and answer
    # Periodic evaluation during training follows eval.protocol: the same numbers for the same items.
    model, tokenizer = load_for_generation("tiny-llama", 2)
    config = EvalConfig(tasks=["gsm_symbolic"], limit=3, generation=False, protocol="paper")
    periodic = periodic_eval(model, tokenizer, config)
    assert periodic["eval/gsm_symbolic/answer_prob"] == pytest.approx(metrics["answer_prob"], rel=1e-5)
    assert periodic["eval/gsm_symbolic/answer_prob_full"] == pytest.approx(metrics["answer_prob_full"], rel=1e-5)
