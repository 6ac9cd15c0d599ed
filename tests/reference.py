"""The plain reference of docs/design.md section 1: one ordinary HF forward per (sequence, thought, position)
over  x_0..x_i, <sot>, c_1..c_M, <eot>, x_{i+1}..x_{i+K-1}. Slow on purpose; it shares no code with the
fast path except the wrapped model's weights."""

import torch

from qstar_rl.model import ThinkingLM


def plain_hidden(model: ThinkingLM, embeds: torch.Tensor) -> torch.Tensor:
    """(n, D) embeddings at positions 0..n-1 -> final hidden states (n, D), ordinary causal forward."""
    positions = torch.arange(embeds.shape[0]).unsqueeze(0)
    return model.lm.base_model(inputs_embeds=embeds.unsqueeze(0), position_ids=positions).last_hidden_state[0]


def head(model: ThinkingLM, hidden: torch.Tensor) -> torch.Tensor:
    return model.lm.get_output_embeddings()(hidden).float()


def reference_branch(model: ThinkingLM, input_ids, thought_ids, b: int, r: int, i: int):
    """(thought log-probs (M,), talk log-probs (K,), mixing weights (K,)) of thought r at position i.

    Branch token l sits at index i+1+l of the plain sequence; the output at token l predicts token l+1.
    """
    emb = model.lm.get_input_embeddings()
    length, talk_length = thought_ids.shape[-1], model.thought.talk_length
    text = input_ids[b]
    seq = torch.cat(
        [
            emb(text[: i + 1]),
            model.start_embedding[None],
            emb(thought_ids[b, r, i]),
            model.end_embedding[None],
            emb(text[i + 1 : i + talk_length]),
        ]
    )
    hidden = plain_hidden(model, seq)
    logits = head(model, hidden)
    thought_lp = torch.stack([logits[i + 1 + m].log_softmax(-1)[thought_ids[b, r, i, m]] for m in range(length)])
    if i + talk_length >= len(text):  # some target lies outside the window: no talk outputs
        return thought_lp, None, None
    base_hidden = plain_hidden(model, emb(text[: i + talk_length + 1]))
    base_logits = head(model, base_hidden)
    talk_lp, weights = [], []
    for s in range(talk_length):
        h_talk = hidden[i + 2 + length + s]  # branch token M+1+s sits at i+1+(M+1+s): <eot> or x_{i+s}
        w = model.mixing_head(base_hidden[i + s], h_talk)
        mixed = (1 - w) * base_logits[i + s] + w * head(model, h_talk)
        talk_lp.append(mixed.log_softmax(-1)[text[i + s + 1]])
        weights.append(w)
    return thought_lp, torch.stack(talk_lp), torch.stack(weights)


def reference_base_logprobs(model: ThinkingLM, input_ids, b: int, num_real: int) -> torch.Tensor:
    """(num_real - 1,) log p_base(x_{i+1}) from an ordinary forward of the real tokens."""
    text = input_ids[b, :num_real]
    logits = head(model, plain_hidden(model, model.lm.get_input_embeddings()(text)))
    return logits[:-1].log_softmax(-1).gather(-1, text[1:, None]).squeeze(-1)


def reference_greedy_thought(model: ThinkingLM, input_ids, b: int, i: int) -> torch.Tensor:
    """(M,) greedy thought at position i by step-by-step generation without any cache."""
    emb = model.lm.get_input_embeddings()
    seq = torch.cat([emb(input_ids[b, : i + 1]), model.start_embedding[None]])
    tokens = []
    for _ in range(model.thought.length):
        token = head(model, plain_hidden(model, seq))[-1].argmax()
        tokens.append(token)
        seq = torch.cat([seq, emb(token[None])])
    return torch.stack(tokens)


def reference_next_logits(model: ThinkingLM, text: torch.Tensor, think: bool) -> tuple[torch.Tensor, ...]:
    """Next-token logits after the text (n,) by plain forwards without a cache: (logits (V,), greedy thought
    (M,) or None, mixing weight or None). Thinking reads x_0..x_{n-1} <sot> c_1..c_M <eot> and mixes."""
    emb = model.lm.get_input_embeddings()
    base_hidden = plain_hidden(model, emb(text))[-1]
    if not think:
        return head(model, base_hidden), None, None
    thought = reference_greedy_thought(model, text[None], 0, len(text) - 1)
    seq = torch.cat([emb(text), model.start_embedding[None], emb(thought), model.end_embedding[None]])
    talk_hidden = plain_hidden(model, seq)[-1]
    w = model.mixing_head(base_hidden, talk_hidden)
    return (1 - w) * head(model, base_hidden) + w * head(model, talk_hidden), thought, w
