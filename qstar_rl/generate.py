"""Generation with thoughts: before every output token the model thinks one thought, mixes, and talks.

One KV cache holds the text. For each output token at position n (the text so far is x_0..x_{n-1}):
  1. think: <sot> at position n, then c_1..c_M (greedy or sampled), then <eot>, each step reading the cache;
  2. mix: w = mixing_head(h_base(n-1), h_talk(<eot>)), logits (1 - w) z_base + w z_talk, pick x_n;
  3. drop the thought's K/V entries (the cache is cropped back to n) and append x_n at position n.
These are the positions and attention of training's branch `<sot> c_1..c_M <eot>` at i = n-1, so what the
model learnt to use is what it gets here. Costs M + 2 forwards of one token per output token (plain
generation: 1).

    qstar-rl generate --checkpoint runs/default --prompt "Tom has 3 apples" --show-thoughts   # or exported/
    qstar-rl generate --prompt "Tom has 3 apples" --time        # SmolLM2-135M, untrained thinking parts
"""

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from qstar_rl.core.mixing import mix_logits
from qstar_rl.model import ThinkingLM


@dataclass
class Generation:
    """What `generate` produced for a batch of prompts of equal length."""

    tokens: torch.Tensor
    """(B, N) the generated tokens."""
    thoughts: torch.Tensor
    """(B, N, M) the thought thought before each generated token (empty M when thinking is off)."""
    mixing_weights: torch.Tensor
    """(B, N) the mixing weight w used for each generated token (0 when thinking is off)."""


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None):
    """(B, V) -> (B,) next tokens."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(
    model: ThinkingLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    think: bool = True,
    greedy_thoughts: bool = True,
    greedy_tokens: bool = True,
    temperature: float = 1.0,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Generation:
    """Generate up to max_new_tokens after the prompts input_ids (B, P) (no padding), thinking a thought of
    M tokens before each one when `think`. Stops early once every sequence has emitted eos_token_id."""
    lm, length = model.lm, model.thought.length
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    cache = transformers.DynamicCache(config=lm.config)

    def forward(embeds: torch.Tensor, first_position: int) -> torch.Tensor:
        """(B, S, D) at positions first_position.. -> final hidden states (B, S, D), extending the cache."""
        positions = torch.arange(first_position, first_position + embeds.shape[1], device=device)
        out = lm.base_model(
            inputs_embeds=embeds, position_ids=positions.expand(batch, -1), past_key_values=cache, use_cache=True
        )
        return out.last_hidden_state

    base_hidden = forward(model._embed(input_ids), 0)[:, -1]  # (B, D) at x_{n-1}
    start = model._meta(model.start_embedding, base_hidden).expand(batch, 1, -1)  # (B, 1, D)
    end = model._meta(model.end_embedding, base_hidden).expand(batch, 1, -1)
    tokens, thoughts, weights = [], [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for n in range(prompt_len, prompt_len + max_new_tokens):
        base_logits = model._logits(base_hidden).float()  # (B, V)
        thought = torch.empty(batch, length if think else 0, dtype=torch.long, device=device)  # (B, M)
        weight = torch.zeros(batch, device=device)
        if think:
            hidden = forward(start, n)[:, -1]  # <sot> at n
            for m in range(length):
                thought[:, m] = _pick(model._logits(hidden).float(), greedy_thoughts, temperature, generator)
                if m + 1 < length:
                    hidden = forward(model._embed(thought[:, m : m + 1]), n + 1 + m)[:, -1]
            last = torch.cat([model._embed(thought[:, -1:]), end], dim=1)  # c_M at n+M, <eot> at n+M+1
            talk_hidden = forward(last, n + length)[:, -1]  # (B, D)
            weight = model.mixing_head(base_hidden, talk_hidden)  # (B,)
            mixed = mix_logits(base_logits, model._logits(talk_hidden).float(), weight)  # (B, V)
            cache.crop(n - cache.get_seq_length())  # forget the thought (M + 2 entries): x_n goes at n
        else:
            mixed = base_logits
        token = _pick(mixed, greedy_tokens, temperature, generator)  # (B,)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        tokens.append(token)
        thoughts.append(thought)
        weights.append(weight.float())
        if bool(finished.all()):
            break
        base_hidden = forward(model._embed(token[:, None]), n)[:, -1]
    return Generation(torch.stack(tokens, 1), torch.stack(thoughts, 1), torch.stack(weights, 1))


# ---- `qstar-rl generate` ----------------------------------------------------------------------------


def load_for_generation(source: str, thought_length: int) -> tuple[ThinkingLM, object]:
    """ThinkingLM and tokenizer from an exported folder (`qstar-rl export`), a training run directory or
    checkpoint folder, or any model name that `load_lm` takes (an untrained ThinkingLM: w = 0, so it talks
    exactly like the base model, with M = thought_length)."""
    from qstar_rl.config import ThoughtConfig
    from qstar_rl.export import load_checkpoint
    from qstar_rl.model import THINKING_CONFIG, load_lm, load_tokenizer

    path = Path(source)
    if (path / THINKING_CONFIG).is_file():
        return ThinkingLM.from_pretrained(path), load_tokenizer(source)
    if path.is_dir():
        return load_checkpoint(path)
    lm, tokenizer = load_lm(source)
    return ThinkingLM(lm, ThoughtConfig(length=thought_length), tokenizer=tokenizer), tokenizer


def seconds_per_token(model: ThinkingLM, input_ids: torch.Tensor, tokens: int, think: bool) -> float:
    """Wall time per output token of greedy generation (no early stop), after one warm-up token."""
    generate(model, input_ids, 1, think=think)
    start = time.perf_counter()
    generate(model, input_ids, tokens, think=think)
    return (time.perf_counter() - start) / tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qstar-rl generate", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--checkpoint",
        "--model",
        default="smollm2-135m",
        help="exported folder, run directory, checkpoint folder, or a model name (untrained thinking parts)",
    )
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-think", action="store_true", help="plain generation, for comparison")
    parser.add_argument("--show-thoughts", action="store_true", help="print each thought before its token")
    parser.add_argument("--sample", action="store_true", help="sample thoughts and tokens (default: greedy)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--thought-length", type=int, default=8, help="M for a model that is not exported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time", action="store_true", help="also report seconds per token vs plain generation")
    args = parser.parse_args(argv)

    with contextlib.redirect_stdout(sys.stderr):  # loaders' chatter (DeepSpeed's zero_to_fp32): stdout is the text
        model, tokenizer = load_for_generation(args.checkpoint, args.thought_length)
    model.eval()
    input_ids = tokenizer(args.prompt, return_tensors="pt").input_ids  # (1, P)
    out = generate(
        model,
        input_ids,
        args.max_new_tokens,
        think=not args.no_think,
        greedy_thoughts=not args.sample,
        greedy_tokens=not args.sample,
        temperature=args.temperature,
        eos_token_id=tokenizer.eos_token_id,
        generator=torch.Generator().manual_seed(args.seed),
    )
    pieces = [args.prompt]
    for n, token in enumerate(out.tokens[0].tolist()):
        if args.show_thoughts and out.thoughts.shape[2]:
            thought = tokenizer.decode(out.thoughts[0, n]).replace("\n", "\\n")
            pieces.append(f"<|{thought}|w={out.mixing_weights[0, n]:.2f}|>")
        pieces.append(tokenizer.decode([token]))
    print("".join(pieces))
    if args.time:
        thinking = seconds_per_token(model, input_ids, args.max_new_tokens, think=True)
        plain = seconds_per_token(model, input_ids, args.max_new_tokens, think=False)
        print(
            f"seconds per output token: thinking {thinking:.4f} (M={model.thought.length}), plain {plain:.4f}, "
            f"ratio {thinking / plain:.1f}x",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
