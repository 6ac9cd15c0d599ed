"""Difficult tokens and pictures: deciles by hand, per-token effects against the slow reference, and a
self-contained HTML page that shows every token and every thought."""

import html
import re

import pytest
import torch
from conftest import make_model
from reference import reference_next_logits

from qstar_rl.core.analysis import difficulty_deciles
from qstar_rl.loading import load_tokenizer
from qstar_rl.report import TokenEffects, main, token_effects, write_report


def test_deciles_group_tokens_by_base_nll_easiest_first():
    base = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 0.5, 6.0])  # 7 tokens into 3 groups: 3, 2, 2
    think = base - torch.tensor([0.0, 0.1, 0.0, 0.1, 1.0, 0.0, -2.0])
    rows = difficulty_deciles(base, think, groups=3)
    assert [r["tokens"] for r in rows] == [3, 2, 2]
    assert [(r["base_nll_min"], r["base_nll_max"]) for r in rows] == [(0.5, 2.0), (3.0, 4.0), (5.0, 6.0)]
    assert rows[0]["delta_nll"] == pytest.approx(-0.2 / 3) and rows[0]["frac_helped"] == pytest.approx(2 / 3)
    assert rows[1]["delta_nll"] == pytest.approx(-0.5) and rows[2]["delta_nll"] == pytest.approx(1.0)
    assert rows[2]["think_nll"] == pytest.approx(6.5)


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_token_effects_equal_the_slow_reference(family):
    torch.manual_seed(0)
    model = make_model(family, num_thoughts=2, length=3).eval()
    input_ids = torch.randint(1, model.lm.config.vocab_size, (2, 11))
    mask = torch.ones_like(input_ids)
    mask[1, 7:] = 0  # right padding
    effects = token_effects(model, input_ids, mask)
    assert model.thought.num_thoughts == 2, "R is restored after the analysis"
    assert effects.predicted.sum() == 10 + 6
    with torch.no_grad():
        for b, n in ((0, 11), (1, 7)):
            for i in range(n - 1):
                text, target = input_ids[b, : i + 1], input_ids[b, i + 1]
                logits, thought, w = reference_next_logits(model, text, think=True)
                assert torch.equal(effects.thoughts[b, i], thought)
                assert effects.think_nll[b, i].item() == pytest.approx(-logits.log_softmax(-1)[target].item(), abs=1e-4)
                base, _, _ = reference_next_logits(model, text, think=False)
                assert effects.base_nll[b, i].item() == pytest.approx(-base.log_softmax(-1)[target].item(), abs=1e-4)
                assert effects.weight[b, i].item() == pytest.approx(w.item(), abs=1e-5)


def test_the_html_page_is_self_contained_and_shows_every_token_and_thought(tmp_path):
    tokenizer = load_tokenizer("smollm2-135m")
    text = 'Tom has 3 apples & buys <2> more.\nHow many "apples"?'
    ids = torch.tensor([tokenizer.encode(text)])
    steps, length = ids.shape[1], 3
    gen = torch.Generator().manual_seed(0)
    thoughts = torch.randint(100, 5000, (1, steps, length), generator=gen)
    effects = TokenEffects(
        input_ids=ids,
        predicted=torch.arange(steps)[None] < steps - 1,
        base_nll=torch.rand(1, steps, generator=gen) * 5,
        think_nll=torch.rand(1, steps, generator=gen) * 5,
        weight=torch.rand(1, steps, generator=gen),
        thoughts=thoughts,
    )
    rows = [
        {
            "step": s,
            "reward/mean": -s,
            "reward/var_within_position": s / 10,
            "mixing/weight_mean": s / 100,
            "loss/nll_base": 3.0,
            "loss/nll_talk": 3.1,
        }
        for s in range(1, 6)
    ]
    rows[-1]["eval/gsm_symbolic/answer_prob"] = 0.1
    summary = write_report(tmp_path, tokenizer, effects, "test <page>", rows)
    page = (tmp_path / "index.html").read_text()
    # Self-contained: nothing to fetch (no http(s) URL, external src/href, CSS url() or @import).
    assert not re.search(r"https?://|@import|url\(|<link|<script", page)
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', page))
    for token in ids[0].tolist():  # every token of the input, escaped
        assert html.escape(tokenizer.decode([token])).replace("\n", "↵<br>") in page
    for i in range(steps - 1):  # every thought (the one before the last token's successor does not exist)
        assert html.escape(tokenizer.decode(thoughts[0, i].tolist())).replace("\n", "↵") in page
    assert "test &lt;page&gt;" in page and summary["tokens"] == steps - 1
    for name in ("difficult_tokens.png", "curves.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "difficult_tokens.md").read_text().count("\n") == 2 + min(10, steps - 1)


def test_the_report_command_writes_everything_for_a_text_file(tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("The cat sat on the mat. " * 30)
    out = tmp_path / "report"
    args = ["--checkpoint", "tiny-llama", "--text", str(text), "--seq-len", "40", "--windows", "3"]
    assert main([*args, "--thought-length", "2", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"index.html", "difficult_tokens.md", "difficult_tokens.json"}
    assert "| decile |" in capsys.readouterr().out
