"""ThinkingLM: a Quiet-STaR thinking wrapper around any decoder-only Hugging Face causal LM.

This is the only module that touches transformers modelling code. The trick that makes it model-agnostic:
a custom attention implementation ("qstar_branch") registered with transformers. In a plain forward it
is SDPA. When a `BranchAttention` state object travels in the forward's kwargs (which transformers hands
down to every attention call, also under gradient checkpointing), it records the text keys/values during
the text pass and, during branch passes, makes the branch queries attend to those text keys plus their own
branch (core/attention.py). So the text is encoded once, branches never copy it, and every model family
that uses the attention interface works without patching its modelling file.
"""

import contextvars
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from qstar_rl.config import ThoughtConfig
from qstar_rl.core.attention import branch_attention, branch_attention_dense
from qstar_rl.core.layout import branch_length, branch_position_ids, gather_shifted, valid_positions
from qstar_rl.core.mixing import MixingHead, mix_logits, token_logprobs

ATTENTION_NAME = "qstar_branch"

# Branch passes feed no 2D mask and need no 4D mask; this flag stops transformers from building one
# (it would be (L*R*T)^2). Mask creation happens once per model forward, never inside checkpointed layers.
_build_mask = contextvars.ContextVar("qstar_build_mask", default=True)


class BranchAttention:
    """Per-forward state of the branch attention: text K/V per layer and, while decoding, branch K/V."""

    def __init__(self, text_key_mask: torch.Tensor, num_thoughts: int, dense: bool = False) -> None:
        self.text_key_mask = text_key_mask.bool()  # (B, T)
        self.num_thoughts = num_thoughts
        self.dense = dense
        self.recording_text = True
        self.keep_branch_kv = False
        self.text_kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        self.branch_kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, module: nn.Module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        if self.recording_text:
            self.text_kv[module] = (key, value)  # (B, Hkv, T, d), after RoPE
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
        if self.keep_branch_kv and module in self.branch_kv:  # decoding: earlier steps of the same branches
            old_key, old_value = self.branch_kv[module]
            key, value = torch.cat([old_key, key], dim=2), torch.cat([old_value, value], dim=2)
        if self.keep_branch_kv:
            self.branch_kv[module] = (key, value)
        k_text, v_text = self.text_kv[module]
        attend = branch_attention_dense if self.dense else branch_attention
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = attend(query, k_text, v_text, key, value, self.text_key_mask, self.num_thoughts, scale)
        return out.transpose(1, 2).contiguous(), None  # (B, N, H, d) as transformers expects


def _qstar_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    state = kwargs.pop("qstar_branch", None)
    if state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    return state.attend(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _qstar_mask(*args, **kwargs):
    return sdpa_mask(*args, **kwargs) if _build_mask.get() else None


transformers.AttentionInterface.register(ATTENTION_NAME, _qstar_attention)
transformers.AttentionMaskInterface.register(ATTENTION_NAME, _qstar_mask)


@dataclass
class ScoreOutput:
    """What `ThinkingLM.score` returns; every tensor is autograd-connected except `valid`."""

    thought_logprobs: torch.Tensor
    """(B, R, T, M) log softmax(z^(m))[c_{m+1}] at temperature 1."""
    policy_logprobs: torch.Tensor
    """(B, R, T, M) the same at tau_reinforce, for the policy-gradient loss."""
    talk_logprobs: torch.Tensor
    """(B, R, T, K) log p of x_{i+s+1} under the mixed logits."""
    mixing_weight: torch.Tensor
    """(B, R, T, K) the mixing head's weight w."""
    base_logprobs: torch.Tensor
    """(B, T) log p_base(x_{i+1}); the last column is 0 and unused."""
    valid: torch.Tensor
    """(B, T) bool: x_{i+1..i+K} inside the window and real."""


class ThinkingLM(nn.Module):
    """A causal LM that thinks M tokens between <sot> and <eot> after every position (Quiet-STaR)."""

    def __init__(self, lm: transformers.PreTrainedModel, thought: ThoughtConfig, tokenizer: Any = None) -> None:
        super().__init__()
        if thought.num_thoughts < 1 or thought.length < 1 or thought.talk_length < 1:
            raise ValueError(f"need R, M, K >= 1, got {thought}")
        if thought.attention not in ("efficient", "dense"):
            raise ValueError(f"thought.attention must be 'efficient' or 'dense', got {thought.attention!r}")
        self.lm = lm
        self.thought = thought
        lm.set_attn_implementation(ATTENTION_NAME)
        embeddings = lm.get_input_embeddings().weight  # (V, D)
        init = _meta_token_init(embeddings, thought, tokenizer)
        self.start_embedding = nn.Parameter(init.clone())  # (D,)
        self.end_embedding = nn.Parameter(init.clone())  # (D,)
        self.mixing_head = MixingHead(embeddings.shape[1]).to(device=embeddings.device, dtype=embeddings.dtype)

    # ---- building blocks -------------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, state: BranchAttention):
        """Text pass: (B, T) -> final hidden states (B, T, D); records every layer's K/V in `state`."""
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        state.recording_text = True
        out = self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            qstar_branch=state,
        )
        state.recording_text = False
        return out.last_hidden_state

    def _encode_branches(self, embeds: torch.Tensor, first_step: int, state: BranchAttention) -> torch.Tensor:
        """Branch pass: embeds (B, S*R*T, D) for steps first_step.. -> final hidden states (B, S*R*T, D)."""
        batch = embeds.shape[0]
        num_thoughts, seq_len = state.num_thoughts, state.text_key_mask.shape[1]
        steps = embeds.shape[1] // (num_thoughts * seq_len)
        positions = branch_position_ids(steps, num_thoughts, seq_len, first_step).to(embeds.device)
        token = _build_mask.set(False)
        try:
            out = self.lm.base_model(
                inputs_embeds=embeds, position_ids=positions.expand(batch, -1), use_cache=False, qstar_branch=state
            )
        finally:
            _build_mask.reset(token)
        return out.last_hidden_state

    def _meta(self, embedding: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return embedding.to(like.dtype)

    # ---- public API ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_thoughts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        temperature: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample R thoughts of M tokens at every position: one text pass, then M steps over all branches.

        Returns thought_ids (B, R, T, M) and their log-probs at temperature 1 (B, R, T, M), which is what
        `score` recomputes, so the two agree for the same weights.
        """
        batch, seq_len = input_ids.shape
        num_thoughts, length = self.thought.num_thoughts, self.thought.length
        tau = self.thought.sample_temperature if temperature is None else temperature
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        state = BranchAttention(attention_mask, num_thoughts, dense=self.thought.attention == "dense")
        self._encode_text(input_ids, attention_mask, state)
        state.keep_branch_kv = True
        dtype = self.lm.get_input_embeddings().weight.dtype
        embeds = self.start_embedding.to(dtype).expand(batch, num_thoughts * seq_len, -1)  # (B, R*T, D)
        ids, logprobs = [], []
        for step in range(length):
            hidden = self._encode_branches(embeds, step, state)  # (B, R*T, D)
            logits = self._logits(hidden).float()  # (B, R*T, V)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                probs = (logits / tau).softmax(dim=-1).view(-1, logits.shape[-1])
                token = torch.multinomial(probs, 1, generator=generator).view(batch, -1)
            ids.append(token)
            logprobs.append(token_logprobs(logits, token))
            if step + 1 < length:
                embeds = self._embed(token)
        shape = (batch, num_thoughts, seq_len, length)
        return torch.stack(ids, dim=-1).view(shape), torch.stack(logprobs, dim=-1).view(shape)

    def score(
        self, input_ids: torch.Tensor, thought_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> ScoreOutput:
        """One forward with gradients over the text and all B*R*T branches <sot> c_1..c_M <eot> x_{i+1}.."""
        batch, seq_len = input_ids.shape
        _, num_thoughts, _, length = thought_ids.shape
        talk_length = self.thought.talk_length
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        state = BranchAttention(attention_mask, num_thoughts, dense=self.thought.attention == "dense")

        base_hidden = self._encode_text(input_ids, attention_mask, state)  # (B, T, D)
        base_logits = self._logits(base_hidden)  # (B, T, V)
        base_logprobs = torch.zeros(batch, seq_len, device=input_ids.device)
        base_logprobs[:, :-1] = token_logprobs(base_logits[:, :-1], input_ids[:, 1:])

        # Branch inputs in step-major layout (B, L, R, T, D): <sot>, c_1..c_M, <eot>, x_{i+1}..x_{i+K-1}.
        thoughts = self._embed(thought_ids.permute(0, 3, 1, 2))  # (B, M, R, T, D)
        future = self._embed(gather_shifted(input_ids, range(1, talk_length)))  # (B, K-1, T, D)
        future = future.unsqueeze(2).expand(-1, -1, num_thoughts, -1, -1)  # (B, K-1, R, T, D)
        meta_shape = (batch, 1, num_thoughts, seq_len, thoughts.shape[-1])
        start = self._meta(self.start_embedding, thoughts).expand(meta_shape)
        end = self._meta(self.end_embedding, thoughts).expand(meta_shape)
        embeds = torch.cat([start, thoughts, end, future], dim=1)  # (B, L, R, T, D)
        steps = branch_length(length, talk_length)
        hidden = self._encode_branches(embeds.reshape(batch, -1, embeds.shape[-1]), 0, state)
        hidden = hidden.view(batch, steps, num_thoughts, seq_len, -1)  # (B, L, R, T, D)

        # Think: outputs at <sot>, c_1..c_{M-1} predict c_1..c_M.
        thought_logits = self._logits(hidden[:, :length]).float()  # (B, M, R, T, V)
        targets = thought_ids.permute(0, 3, 1, 2)  # (B, M, R, T)
        thought_logprobs = token_logprobs(thought_logits, targets).permute(0, 2, 3, 1)  # (B, R, T, M)
        policy_logprobs = token_logprobs(thought_logits, targets, self.thought.reinforce_temperature)
        policy_logprobs = policy_logprobs.permute(0, 2, 3, 1)

        # Talk: outputs at <eot>, x_{i+1}..x_{i+K-1} predict x_{i+1}..x_{i+K}, mixed with base position i+s.
        talk_hidden = hidden[:, length + 1 :]  # (B, K, R, T, D)
        base_hidden_s = gather_shifted(base_hidden, range(talk_length)).unsqueeze(2)  # (B, K, 1, T, D)
        weight = self.mixing_head(base_hidden_s.expand_as(talk_hidden), talk_hidden)  # (B, K, R, T)
        base_logits_s = gather_shifted(base_logits, range(talk_length)).unsqueeze(2)  # (B, K, 1, T, V)
        mixed = mix_logits(base_logits_s, self._logits(talk_hidden), weight)  # (B, K, R, T, V)
        talk_targets = gather_shifted(input_ids, range(1, talk_length + 1)).unsqueeze(2)  # (B, K, 1, T)
        talk_logprobs = token_logprobs(mixed, talk_targets.expand(-1, -1, num_thoughts, -1))  # (B, K, R, T)

        return ScoreOutput(
            thought_logprobs=thought_logprobs,
            policy_logprobs=policy_logprobs,
            talk_logprobs=talk_logprobs.permute(0, 2, 3, 1),
            mixing_weight=weight.permute(0, 2, 3, 1),
            base_logprobs=base_logprobs,
            valid=valid_positions(attention_mask, talk_length),
        )


def _meta_token_init(embeddings: torch.Tensor, thought: ThoughtConfig, tokenizer: Any) -> torch.Tensor:
    """(D,) initial value of <sot>/<eot>: the first token of thought.init_token, else init_token_id, else
    the mean input embedding."""
    with torch.no_grad():
        if tokenizer is not None:
            token_ids = tokenizer.encode(thought.init_token, add_special_tokens=False)
            if not token_ids:
                raise ValueError(f"thought.init_token {thought.init_token!r} encodes to no tokens")
            return embeddings[token_ids[0]].detach().clone()
        if thought.init_token_id is not None:
            return embeddings[thought.init_token_id].detach().clone()
        return embeddings.mean(dim=0).detach().clone()


# ---- model construction -------------------------------------------------------------------------

TINY_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")


def tiny_lm(family: str, vocab_size: int = 97, hidden_size: int = 48, num_layers: int = 2, seed: int = 0):
    """A small random decoder-only model of the given family (grouped-query attention where the family
    has it), for tests and benchmarks. Sizes are deliberately not powers of two."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    else:
        config_class = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
        config = config_class(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size + 8,
            num_hidden_layers=num_layers,
            num_attention_heads=6,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=family == "llama",
        )
        if family == "mistral":
            config.sliding_window = None
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()
