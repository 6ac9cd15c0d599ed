"""Generation with thoughts against a slow reference loop that re-reads the whole sequence at every step."""

import pytest
import torch
from conftest import FAMILIES, make_model
from reference import reference_next_logits

from qstar_rl.generate import generate


def reference_generate(model, prompt: torch.Tensor, steps: int, think: bool = True):
    """(P,) -> greedy tokens (steps,), thoughts (steps, M), weights (steps,): no cache, one plain forward
    over x_0..x_{n-1} <sot> c_1..c_M <eot> per thought token and per output token."""
    text, thoughts, weights = prompt.clone(), [], []
    for _ in range(steps):
        logits, thought, w = reference_next_logits(model, text, think)
        if think:
            thoughts.append(thought)
            weights.append(w)
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


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_prompts_of_different_lengths_generate_what_each_generates_alone(family):
    model = make_model(family, length=3).eval()
    lengths = [6, 3, 5]  # not sorted, one unpadded
    prompts = [torch.randint(0, model.lm.config.vocab_size, (n,)) for n in lengths]
    input_ids = torch.zeros(3, max(lengths), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, prompt in enumerate(prompts):
        input_ids[b, -len(prompt) :], attention_mask[b, -len(prompt) :] = prompt, 1
    with torch.no_grad():
        together = generate(model, input_ids, max_new_tokens=4, attention_mask=attention_mask)
        for b, prompt in enumerate(prompts):
            alone = generate(model, prompt[None], max_new_tokens=4)
            assert torch.equal(together.tokens[b], alone.tokens[0])
            assert torch.equal(together.thoughts[b], alone.thoughts[0])
            torch.testing.assert_close(together.mixing_weights[b], alone.mixing_weights[0], atol=1e-5, rtol=1e-4)


def test_right_padded_prompts_are_refused():
    model = make_model("llama").eval()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.ones(1, 4, dtype=torch.long), 1, attention_mask=torch.tensor([[1, 1, 0, 0]]))


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
