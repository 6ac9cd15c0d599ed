"""ThinkingLM: a Quiet-STaR thinking wrapper around any decoder-only Hugging Face causal LM.

This is the only module that touches transformers modelling code. The trick that makes it model-agnostic:
a custom attention implementation ("qstar_branch") registered with transformers. In a plain forward it
is SDPA. When a pass object travels in the forward's kwargs (which transformers hands down to every
attention call, also when gradient checkpointing recomputes a layer), a `TextPass` records the text
keys/values, and a `BranchPass` makes the branch queries attend to those text keys plus their own branch
(core/attention.py). So the text is encoded once, branches never copy it, and every model family
that uses the attention interface works without patching its modelling file.
"""

import contextvars
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from qstar_rl.config import ThoughtConfig
from qstar_rl.core.attention import branch_attention, branch_attention_dense
from qstar_rl.core.layout import branch_length, branch_position_ids, gather_shifted, valid_positions
from qstar_rl.core.mixing import MixingHead, mix_logits, token_logprobs

ATTENTION_NAME = "qstar_branch"
THINKING_WEIGHTS = "thinking.safetensors"
THINKING_CONFIG = "thinking.json"

# Branch passes feed no 2D mask and need no 4D mask; this flag stops transformers from building one
# (it would be (L*R*T)^2). Mask creation happens once per model forward, never inside checkpointed layers.
_build_mask = contextvars.ContextVar("qstar_build_mask", default=True)


class TextPass:
    """The text pass's attention: plain SDPA that also records every layer's text keys/values (after RoPE).

    The pass is named by the object itself, never by a flag that changes later: gradient checkpointing
    re-runs a layer during backward with the kwargs of its first call, so a recomputed text layer must
    still take this path. The first recording wins; a recompute sees the same values and must not replace
    the tensors that the branch pass's autograd graph already holds.
    """

    def __init__(self, text_key_mask: torch.Tensor) -> None:
        self.text_key_mask = text_key_mask.bool()  # (B, T)
        self.text_kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, module: nn.Module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        self.text_kv.setdefault(module, (key, value))  # (B, Hkv, T, d) each
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


class BranchPass:
    """A branch pass's attention: branch queries attend to the recorded text keys plus their own branch.

    With `keep_branch_kv` (decoding, no gradients) each call appends its keys/values to those of the earlier
    steps of the same branches; scoring feeds every step at once and keeps nothing, so a checkpointed
    recompute sees exactly what the first call saw.
    """

    def __init__(self, text: TextPass, num_thoughts: int, dense: bool = False, keep_branch_kv: bool = False) -> None:
        self.text = text
        self.num_thoughts = num_thoughts
        self.dense = dense
        self.keep_branch_kv = keep_branch_kv
        self.branch_kv: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, module: nn.Module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        if self.keep_branch_kv:
            if module in self.branch_kv:  # decoding: earlier steps of the same branches
                old_key, old_value = self.branch_kv[module]
                key, value = torch.cat([old_key, key], dim=2), torch.cat([old_value, value], dim=2)
            self.branch_kv[module] = (key, value)
        k_text, v_text = self.text.text_kv[module]
        attend = branch_attention_dense if self.dense else branch_attention
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = attend(query, k_text, v_text, key, value, self.text.text_key_mask, self.num_thoughts, scale)
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


class ScoreOutput(NamedTuple):
    """What `ThinkingLM.score` returns; every tensor is autograd-connected except `valid`. A NamedTuple, so
    that DeepSpeed ZeRO-3's module hooks see the tensors inside it. Without thoughts (thought_ids None) the
    four thought fields are None."""

    thought_logprobs: torch.Tensor | None
    """(B, R, T, M) log softmax(z^(m))[c_{m+1}] at temperature 1."""
    policy_logprobs: torch.Tensor | None
    """(B, R, T, M) the same at tau_reinforce, for the policy-gradient loss."""
    talk_logprobs: torch.Tensor | None
    """(B, R, T, K) log p of x_{i+s+1} under the mixed logits."""
    mixing_weight: torch.Tensor | None
    """(B, R, T, K) the mixing head's weight w."""
    base_logprobs: torch.Tensor
    """(B, T) log p_base(x_{i+1}); the last column is 0 and unused."""
    valid: torch.Tensor
    """(B, T) bool: x_{i+1..i+K} inside the window and real."""


class NonFiniteModel(RuntimeError):
    """The model's weights or outputs are no longer finite (an optimizer step overflowed): training stops."""


def _sample(logits: torch.Tensor, tau: float, generator) -> torch.Tensor:
    """One token per row of logits (B, N, V) at temperature tau: one generator, or one per sequence.

    Inverse-CDF sampling: one uniform number per row against the float64 cumulative probabilities, exact like
    torch.multinomial, which draws V exponential variates per row instead (0.1 s a decode step at N = R*T = 128
    rows and V = 49,152 on 2 CPU cores, 8% of a default step). right=True never picks a token of probability 0."""
    probs = (logits / tau).softmax(dim=-1)  # (B, N, V)
    cdf = probs.double().cumsum(dim=-1)  # (B, N, V)
    total = cdf[..., -1]  # (B, N): 1 up to rounding; not finite when any probability is not
    if not torch.isfinite(total).all():
        raise NonFiniteModel(
            "thought sampling met non-finite probabilities: the weights have overflowed (optim.lr far too high?). "
            "Lower optim.lr and resume from the last complete checkpoint."
        )
    rows = probs.shape[:2]
    if isinstance(generator, list | tuple):  # (B,) generators: row b's uniforms come from generator b
        uniform = torch.stack(
            [torch.rand(rows[1], generator=g, dtype=torch.float64, device=probs.device) for g in generator]
        )
    else:
        uniform = torch.rand(rows, generator=generator, dtype=torch.float64, device=probs.device)
    token = torch.searchsorted(cdf, (uniform * total).unsqueeze(-1), right=True).squeeze(-1)  # (B, N)
    return token.clamp(max=probs.shape[-1] - 1)


class ThinkingLM(nn.Module):
    """A causal LM that thinks M tokens between <sot> and <eot> after every position (Quiet-STaR).

    Wrapping switches the LM's dropout off (`disable_dropout`), so train and eval mode compute the same
    function; train mode only turns on activation checkpointing where it is enabled.
    """

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
        head = MixingHead(embeddings.shape[1], init_std=getattr(lm.config, "initializer_range", 0.02))
        self.mixing_head = head.to(device=embeddings.device, dtype=embeddings.dtype)
        disable_dropout(lm)

    # ---- building blocks -------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits (..., V) of final hidden states (..., D), with the model's logit soft-capping."""
        logits = self.lm.get_output_embeddings()(hidden)
        cap = getattr(self.lm.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings (..., D) of token ids (...)."""
        return self.lm.get_input_embeddings()(ids)

    def _encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embeds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TextPass]:
        """Text pass: (B, T) -> final hidden states (B, T, D) and the TextPass holding every layer's K/V.
        `embeds` (B, T, D): the ids' input embeddings, when the caller looked them up already."""
        batch, seq_len = input_ids.shape
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
        text = TextPass(attention_mask)
        out = self.lm.base_model(
            input_ids=None if embeds is not None else input_ids,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=False,
            qstar_branch=text,
        )
        return out.last_hidden_state, text

    def _encode_branches(self, embeds: torch.Tensor, first_step: int, state: BranchPass) -> torch.Tensor:
        """Branch pass: embeds (B, S*R*T, D) for steps first_step.. -> final hidden states (B, S*R*T, D)."""
        batch = embeds.shape[0]
        num_thoughts, seq_len = state.num_thoughts, state.text.text_key_mask.shape[1]
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

    def meta_embedding(self, embedding: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """<sot> or <eot> (D,) in the compute dtype of `like` (the meta tokens train in fp32)."""
        return embedding.to(like.dtype)

    def _thought_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor):
        """hidden (..., D), targets (...) -> log-probs at temperature 1 and at tau_reinforce."""
        logits = self.logits(hidden).float()  # (..., V)
        return token_logprobs(logits, targets), token_logprobs(logits, targets, self.thought.reinforce_temperature)

    def _talk_logprobs(self, talk_hidden: torch.Tensor, base_hidden: torch.Tensor, targets: torch.Tensor):
        """talk_hidden (B, K, R, t, D), base_hidden (B, K, 1, t, D) at i+s, targets (B, K, 1, t) x_{i+s+1}
        -> mixed log-probs and mixing weights, (B, K, R, t) each."""
        weight = self.mixing_head(base_hidden.expand_as(talk_hidden), talk_hidden)  # (B, K, R, t)
        mixed = mix_logits(self.logits(base_hidden), self.logits(talk_hidden), weight)  # (B, K, R, t, V) fp32
        return token_logprobs(mixed, targets.expand(weight.shape)), weight

    def _per_position_chunks(self, fn, *tensors: torch.Tensor):
        """Apply fn to slices of the T axis (dim 3 of every tensor) and concatenate its outputs along it.

        The V-wide logits inside fn are the largest tensors of the step; with gradients on, each chunk runs
        under activation checkpointing, so backward keeps only the D-wide inputs and recomputes the logits of
        one chunk at a time. Peak memory then follows the number of branch tokens, not tokens * V.
        """
        seq_len = tensors[0].shape[3]
        tokens_per_position = tensors[0].shape[:3].numel()  # B * (M or K) * R
        budget = self.thought.logits_chunk_tokens
        small = tokens_per_position * seq_len <= budget
        if budget <= 0 or (small and not torch.is_grad_enabled()):
            return fn(*tensors)
        chunk = max(1, budget // tokens_per_position)
        pieces = []
        for start in range(0, seq_len, chunk):
            parts = [t[:, :, :, start : start + chunk] for t in tensors]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(fn, *parts, use_reentrant=False))
            else:
                pieces.append(fn(*parts))
        return tuple(torch.cat(outputs, dim=3) for outputs in zip(*pieces, strict=True))

    # ---- saving ----------------------------------------------------------------------------------

    def save_pretrained(self, folder: str | Path, tokenizer: Any = None) -> None:
        """A plain HF folder (the LM, loadable by AutoModelForCausalLM) plus thinking.safetensors (the
        trained meta tokens and mixing head) and thinking.json (the ThoughtConfig)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        self.lm.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        thinking = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if not k.startswith("lm.")}
        save_file(thinking, str(folder / THINKING_WEIGHTS))
        (folder / THINKING_CONFIG).write_text(json.dumps(asdict(self.thought), indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> "ThinkingLM":
        """Load what `save_pretrained` wrote; the meta tokens keep their trained values."""
        from safetensors.torch import load_file

        folder = Path(folder)
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
        model = cls(lm, ThoughtConfig(**json.loads((folder / THINKING_CONFIG).read_text())))
        missing, unexpected = model.load_state_dict(load_file(str(folder / THINKING_WEIGHTS)), strict=False)
        if unexpected or any(not k.startswith("lm.") for k in missing):
            raise ValueError(f"{folder}: thinking weights do not match (missing {missing}, unexpected {unexpected})")
        return model.to(dtype)

    # ---- public API ------------------------------------------------------------------------------

    @torch.no_grad()
    def sample_thoughts(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        greedy: bool = False,
        temperature: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample R thoughts of M tokens at every position: one text pass, then M steps over all branches.

        `generator` may be one generator for the batch or a list of B, one per sequence: then a sequence's
        thoughts do not depend on what else is in the batch (how the trainer keeps runs with different
        rank counts identical). Returns thought_ids (B, R, T, M) and their log-probs at temperature 1
        (B, R, T, M), which is what `score` recomputes, so the two agree for the same weights.
        """
        batch, seq_len = input_ids.shape
        num_thoughts, length = self.thought.num_thoughts, self.thought.length
        tau = self.thought.sample_temperature if temperature is None else temperature
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        _, text = self._encode_text(input_ids, attention_mask)
        state = BranchPass(text, num_thoughts, dense=self.thought.attention == "dense", keep_branch_kv=True)
        dtype = self.lm.get_input_embeddings().weight.dtype
        embeds = self.start_embedding.to(dtype).expand(batch, num_thoughts * seq_len, -1)  # (B, R*T, D)
        ids, logprobs = [], []
        for step in range(length):
            hidden = self._encode_branches(embeds, step, state)  # (B, R*T, D)
            logits = self.logits(hidden).float()  # (B, R*T, V)
            if greedy:
                token = logits.argmax(dim=-1)
            else:
                token = _sample(logits, tau, generator)  # (B, R*T)
            ids.append(token)
            logprobs.append(token_logprobs(logits, token))
            if step + 1 < length:
                embeds = self.embed(token)
        shape = (batch, num_thoughts, seq_len, length)
        return torch.stack(ids, dim=-1).view(shape), torch.stack(logprobs, dim=-1).view(shape)

    def score(
        self, input_ids: torch.Tensor, thought_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> ScoreOutput:
        """One forward with gradients over the text and all B*R*T branches <sot> c_1..c_M <eot> x_{i+1}..
        thought_ids None: the text pass only (base_logprobs and valid), for the thought-free control.

        Goes through `forward`, so that DeepSpeed ZeRO-3 gathers this module's own parameters (the meta
        tokens) in its forward hook, exactly as it does for every submodule."""
        return self(input_ids, thought_ids, attention_mask)

    def forward(
        self, input_ids: torch.Tensor, thought_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None
    ) -> ScoreOutput:
        """See `score`."""
        batch, seq_len = input_ids.shape
        talk_length = self.thought.talk_length
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        valid = valid_positions(attention_mask, talk_length)
        text_embeds = thoughts = future = None
        if thought_ids is not None:
            # One embedding lookup for the text, the thoughts and the future tokens: the backward of each lookup
            # builds a dense (V, D) gradient (113 MB for SmolLM2), so three lookups cost three zero-fills and two
            # (V, D) additions a step.
            num_thoughts, length = thought_ids.shape[1], thought_ids.shape[3]
            thought_steps = thought_ids.permute(0, 3, 1, 2)  # (B, M, R, T)
            future_ids = gather_shifted(input_ids, range(1, talk_length))  # (B, K-1, T)
            ids = (input_ids, thought_steps, future_ids)
            embeds = self.embed(torch.cat([i.reshape(batch, -1) for i in ids], dim=1))  # (B, T + M*R*T + (K-1)*T, D)
            text_embeds, thoughts, future = embeds.split([i[0].numel() for i in ids], dim=1)
            thoughts = thoughts.view(*thought_steps.shape, embeds.shape[-1])  # (B, M, R, T, D)
            future = future.view(*future_ids.shape, embeds.shape[-1])  # (B, K-1, T, D)
        base_hidden, text = self._encode_text(input_ids, attention_mask, text_embeds)  # (B, T, D)
        base_logprobs = torch.zeros(batch, seq_len, device=input_ids.device)
        base_logprobs[:, :-1] = token_logprobs(self.logits(base_hidden[:, :-1]), input_ids[:, 1:])
        if thought_ids is None:
            return ScoreOutput(None, None, None, None, base_logprobs, valid)
        state = BranchPass(text, num_thoughts, dense=self.thought.attention == "dense")

        # Branch inputs in step-major layout (B, L, R, T, D): <sot>, c_1..c_M, <eot>, x_{i+1}..x_{i+K-1}.
        future = future.unsqueeze(2).expand(-1, -1, num_thoughts, -1, -1)  # (B, K-1, R, T, D)
        meta_shape = (batch, 1, num_thoughts, seq_len, thoughts.shape[-1])
        start = self.meta_embedding(self.start_embedding, thoughts).expand(meta_shape)
        end = self.meta_embedding(self.end_embedding, thoughts).expand(meta_shape)
        embeds = torch.cat([start, thoughts, end, future], dim=1)  # (B, L, R, T, D)
        steps = branch_length(length, talk_length)
        hidden = self._encode_branches(embeds.reshape(batch, -1, embeds.shape[-1]), 0, state)
        hidden = hidden.view(batch, steps, num_thoughts, seq_len, -1)  # (B, L, R, T, D)

        # Think: outputs at <sot>, c_1..c_{M-1} predict c_1..c_M.
        targets = thought_ids.permute(0, 3, 1, 2)  # (B, M, R, T)
        thought_logprobs, policy_logprobs = self._per_position_chunks(
            self._thought_logprobs, hidden[:, :length], targets
        )  # (B, M, R, T) each

        # Talk: outputs at <eot>, x_{i+1}..x_{i+K-1} predict x_{i+1}..x_{i+K}, mixed with base position i+s.
        talk_targets = gather_shifted(input_ids, range(1, talk_length + 1)).unsqueeze(2)  # (B, K, 1, T)
        base_hidden_s = gather_shifted(base_hidden, range(talk_length)).unsqueeze(2)  # (B, K, 1, T, D)
        talk_logprobs, weight = self._per_position_chunks(
            self._talk_logprobs, hidden[:, length + 1 :], base_hidden_s, talk_targets
        )  # (B, K, R, T) each

        return ScoreOutput(
            thought_logprobs=thought_logprobs.permute(0, 2, 3, 1),
            policy_logprobs=policy_logprobs.permute(0, 2, 3, 1),
            talk_logprobs=talk_logprobs.permute(0, 2, 3, 1),
            mixing_weight=weight.permute(0, 2, 3, 1),
            base_logprobs=base_logprobs,
            valid=valid,
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


def enable_activation_checkpointing(lm: transformers.PreTrainedModel) -> None:
    """Recompute every decoder layer in backward (HF activation checkpointing, non-reentrant).

    Non-reentrant matters: the reentrant variant runs the forward under no_grad, so the text keys/values that
    the branch pass reads would carry no gradient and the text would learn nothing from the thoughts.
    Checkpointing is active only while the LM is in train mode (the learner's phase: `learner.learn_step` sets it).
    """
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.20; the old name warns
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_dropout(lm: nn.Module) -> None:
    """Set every dropout probability of the LM to 0 (dropout modules and the float `attention_dropout` of
    attention modules), as RL trainers do: the learner must score the same policy that sampled the thoughts
    (thought/logprob_gap ~ 0), and the branch attention has no dropout of its own."""
    for module in lm.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
