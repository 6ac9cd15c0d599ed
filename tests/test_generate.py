"""Generation with thoughts against a slow reference loop that re-reads the whole sequence at every step."""

import pytest
import torch
from conftest import FAMILIES, make_model
from reference import head, plain_hidden, reference_greedy_thought

from qstar_rl.generate import generate


def reference_generate(model, prompt: torch.Tensor, steps: int, think: bool = True):
    """(P,) -> greedy tokens (steps,), thoughts (steps, M), weights (steps,): no cache, one plain forward
    over x_0..x_{n-1} <sot> c_1..c_M <eot> per thought token and per output token."""
    emb = model.lm.get_input_embeddings()
    text, thoughts, weights = prompt.clone(), [], []
    for _ in range(steps):
        base_hidden = plain_hidden(model, emb(text))[-1]
        if think:
            thought = reference_greedy_thought(model, text[None], 0, len(text) - 1)
            seq = torch.cat([emb(text), model.start_embedding[None], emb(thought), model.end_embedding[None]])
            talk_hidden = plain_hidden(model, seq)[-1]
            w = model.mixing_head(base_hidden, talk_hidden)
            logits = (1 - w) * head(model, base_hidden) + w * head(model, talk_hidden)
            thoughts.append(thought)
            weights.append(w)
        else:
            logits = head(model, base_hidden)
        text = torch.cat([text, logits.argmax()[None]])
    tokens = text[len(prompt) :]
    return tokens, (torch.stack(thoughts) if think else None), (torch.stack(weights) if think else None)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_thoughts_equals_the_slow_reference(family):
    torch.manual_seed(0)
    model = make_model(family, length=3).eval()
    prompt = torch.randint(0, model.lm.config.vocab_size, (7,))
    with torch.no_grad():
        out = generate(model, prompt[None], max_new_tokens=5)
        tokens, thoughts, weights = reference_generate(model, prompt, 5)
    assert torch.equal(out.tokens[0], tokens)
    assert torch.equal(out.thoughts[0], thoughts)
    torch.testing.assert_close(out.mixing_weights[0], weights, atol=1e-5, rtol=1e-4)
    assert (out.mixing_weights.abs() > 1e-3).all(), "the randomised mixing head really mixes"


def test_without_thinking_it_is_plain_greedy_generation():
    model = make_model("llama").eval()
    prompt = torch.randint(0, model.lm.config.vocab_size, (1, 6))
    with torch.no_grad():
        out = generate(model, prompt, max_new_tokens=6, think=False)
        tokens, _, _ = reference_generate(model, prompt[0], 6, think=False)
    assert torch.equal(out.tokens[0], tokens) and out.thoughts.shape == (1, 6, 0)
    assert not out.mixing_weights.any()


def test_a_batch_generates_what_each_prompt_generates_alone():
    model = make_model("qwen2", length=2).eval()
    prompts = torch.randint(0, model.lm.config.vocab_size, (3, 5))
    with torch.no_grad():
        together = generate(model, prompts, max_new_tokens=4)
        for b in range(3):
            alone = generate(model, prompts[b : b + 1], max_new_tokens=4)
            assert torch.equal(together.tokens[b], alone.tokens[0])
            assert torch.equal(together.thoughts[b], alone.thoughts[0])


def test_generation_stops_at_eos_and_pads_finished_sequences():
    model = make_model("llama").eval()
    prompt = torch.randint(0, model.lm.config.vocab_size, (1, 5))
    with torch.no_grad():
        free = generate(model, prompt, max_new_tokens=6)
        eos = int(free.tokens[0, 2])  # make the third token the end
        out = generate(model, prompt, max_new_tokens=6, eos_token_id=eos)
    first = int((free.tokens[0] == eos).nonzero()[0])
    assert out.tokens.shape[1] == first + 1 and int(out.tokens[0, -1]) == eos


def test_the_generate_command_shows_thoughts_and_reports_the_cost(capsys):
    from qstar_rl.cli import main

    prompt = "Tom has 3 apples and"
    args = ["generate", "--checkpoint", "tiny-llama", "--prompt", prompt, "--max-new-tokens", "3"]
    assert main([*args, "--show-thoughts", "--thought-length", "4", "--time"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(prompt) and out.count("<|") == 3 and out.count("|w=0.00|>") == 3  # untrained: w = 0
    assert "seconds per output token: thinking" in err and "(M=4)" in err
