"""Generation with thoughts: before every output token the model thinks one thought, mixes, and talks.

One KV cache holds the text (`ThinkingDecoder`, shared with evaluation). For each output token at
position n (the text so far is x_0..x_{n-1}):
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
    """What `generate` produced for a batch of prompts."""

    tokens: torch.Tensor
    """(B, N) the generated tokens."""
    thoughts: torch.Tensor
    """(B, N, M) the thought thought before each generated token (empty M when thinking is off)."""
    mixing_weights: torch.Tensor
    """(B, N) the mixing weight w used for each generated token (0 when thinking is off)."""


@dataclass
class Prediction:
    """The next-token prediction at the end of the text so far, for every sequence of the batch."""

    base_logits: torch.Tensor
    """(B, V) the base model's logits z_base."""
    logits: torch.Tensor
    """(B, V) the logits to pick from: mixed after a thought when thinking, else z_base."""
    thought: torch.Tensor
    """(B, M) the thought (M = 0 when not thinking)."""
    weight: torch.Tensor
    """(B,) the mixing weight w (0 when not thinking)."""


def pick(logits: torch.Tensor, greedy: bool, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) next tokens."""
    if greedy:
        return logits.argmax(dim=-1)
    probs = (logits.float() / temperature).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class ThinkingDecoder:
    """A KV cache over a batch of left-padded prompts that can think before predicting the next token.

    `predict` thinks (when asked) and returns the next-token logits without changing the text; `append`
    adds one token per sequence. Generation picks the appended token from the prediction; evaluation
    appends the reference answer (teacher forcing). Position ids count real tokens only, so a left-padded
    prompt sees the positions it would see alone.
    """

    def __init__(self, model: ThinkingLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """input_ids, attention_mask (B, P): prompts, left-padded (mask 0 on the left) when lengths differ."""
        self.model = model
        self.batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool((attention_mask[:, :-1] > attention_mask[:, 1:]).any()):
            raise ValueError("prompts must be left-padded: attention_mask 0s before the 1s")
        self.cache = transformers.DynamicCache(config=model.lm.config)
        self.mask = attention_mask[:, :0]  # (B, cache length): 0 over the left padding
        self.lengths = attention_mask.sum(dim=1)  # (B,) real tokens so far = position of the next token
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, P)
        self.base_hidden = self._forward(model.embed(input_ids), positions, attention_mask)[:, -1]  # (B, D)

    def _forward(self, embeds: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None = None):
        """(B, S, D) at positions (B, S) -> final hidden states (B, S, D); extends the cache and its mask."""
        if mask is None:
            mask = torch.ones(positions.shape, dtype=self.mask.dtype, device=positions.device)
        self.mask = torch.cat([self.mask, mask], dim=1)
        out = self.model.lm.base_model(
            inputs_embeds=embeds,
            attention_mask=self.mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _at(self, offset: int) -> torch.Tensor:
        return (self.lengths + offset)[:, None]  # (B, 1)

    def predict(
        self,
        think: bool = True,
        greedy_thoughts: bool = True,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Prediction:
        """Next-token logits at the end of the text. Thinking puts <sot> c_1..c_M <eot> at positions n..n+M+1
        (n = the next token's position: training's branch at i = n - 1), mixes, and then forgets the thought."""
        model, length = self.model, self.model.thought.length
        base_logits = model.logits(self.base_hidden).float()  # (B, V)
        device = base_logits.device
        if not think:
            empty = torch.empty(self.batch, 0, dtype=torch.long, device=device)
            return Prediction(base_logits, base_logits, empty, torch.zeros(self.batch, device=device))
        kept = self.mask.shape[1]
        meta_shape = (self.batch, 1, self.base_hidden.shape[-1])
        start = model.meta_embedding(model.start_embedding, self.base_hidden).expand(meta_shape)  # (B, 1, D)
        end = model.meta_embedding(model.end_embedding, self.base_hidden).expand(meta_shape)
        thought = torch.empty(self.batch, length, dtype=torch.long, device=device)  # (B, M)
        hidden = self._forward(start, self._at(0))[:, -1]  # <sot> at n
        for m in range(length):
            thought[:, m] = pick(model.logits(hidden).float(), greedy_thoughts, temperature, generator)
            if m + 1 < length:
                hidden = self._forward(model.embed(thought[:, m : m + 1]), self._at(1 + m))[:, -1]
        last = torch.cat([model.embed(thought[:, -1:]), end], dim=1)  # c_M at n+M, <eot> at n+M+1
        talk_hidden = self._forward(last, torch.cat([self._at(length), self._at(length + 1)], dim=1))[:, -1]
        weight = model.mixing_head(self.base_hidden, talk_hidden)  # (B,)
        mixed = mix_logits(base_logits, model.logits(talk_hidden).float(), weight)  # (B, V)
        self.cache.crop(kept - self.cache.get_seq_length())  # forget the M + 2 thought entries
        self.mask = self.mask[:, :kept]
        return Prediction(base_logits, mixed, thought, weight.float())

    def append(self, tokens: torch.Tensor) -> None:
        """Add one token (B,) per sequence at its next position."""
        self.base_hidden = self._forward(self.model.embed(tokens[:, None]), self._at(0))[:, -1]
        self.lengths = self.lengths + 1


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
    attention_mask: torch.Tensor | None = None,
) -> Generation:
    """Generate up to max_new_tokens after the prompts input_ids (B, P) (left-padded per attention_mask when
    their lengths differ), thinking a thought of M tokens before each one when `think`. Stops early once
    every sequence has emitted eos_token_id; finished sequences are padded with it."""
    decoder = ThinkingDecoder(model, input_ids, attention_mask)
    tokens, thoughts, weights = [], [], []
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        prediction = decoder.predict(think, greedy_thoughts, temperature, generator)
        token = pick(prediction.logits, greedy_tokens, temperature, generator)  # (B,)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        tokens.append(token)
        thoughts.append(prediction.thought)
        weights.append(prediction.weight)
        if bool(finished.all()):
            break
        decoder.append(token)
    return Generation(torch.stack(tokens, 1), torch.stack(thoughts, 1), torch.stack(weights, 1))


# ---- `qstar-rl generate` ----------------------------------------------------------------------------


def load_for_generation(source: str, thought_length: int) -> tuple[ThinkingLM, object]:
    """ThinkingLM and tokenizer from an exported folder (`qstar-rl export`), a training run directory or
    checkpoint folder, or any model name that `load_lm` takes (an untrained ThinkingLM: w = 0, so it talks
    exactly like the base model, with M = thought_length)."""
    from qstar_rl.config import ThoughtConfig
    from qstar_rl.export import load_checkpoint
    from qstar_rl.loading import build_thinking_lm, load_tokenizer
    from qstar_rl.model import THINKING_CONFIG

    path = Path(source)
    if (path / THINKING_CONFIG).is_file():
        return ThinkingLM.from_pretrained(path), load_tokenizer(source)
    if path.is_dir():
        return load_checkpoint(path)
    return build_thinking_lm(source, ThoughtConfig(length=thought_length))


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
