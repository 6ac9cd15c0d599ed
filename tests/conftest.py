import os
from pathlib import Path

import pytest
import torch

# Read by Ray at import: keep in-process Ray clients on loopback, so `ray.init(address="127.0.0.1:port")` reaches
# the tests' private cluster instead of being rewritten to the machine's outward address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from qstar_rl.config import ThoughtConfig
from qstar_rl.loading import tiny_lm
from qstar_rl.model import ThinkingLM

FAMILIES = ["llama", "mistral", "qwen2", "gpt2"]


@pytest.fixture(scope="session")
def one_rank_reference(tmp_path_factory) -> Path:
    """The run directory of the colocated `deepspeed` path on the tiny config: 1 ZeRO-3 rank, 4 steps, 2
    accumulation micro-batches of 1 sequence, periodic evaluation. Multi-rank and Ray runs of the same global
    batch must reproduce its metrics; copy it before changing anything in it."""
    from test_train import EVAL, train

    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(run_dir, "train.steps=4", "train.micro_batch_size=1", "train.global_batch_size=2", *EVAL)
    return run_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Ray's tests run last. One of them connects this process to Ray, and Ray's client threads stay after
    ray.shutdown(); in one of two measured suite runs the torch work of later in-process tests then ran up to
    ~100x slower (test_smollm2: 41 s instead of 2.5 s), in the other not. Whatever the cause, nothing runs after
    them but the end of the session."""
    items.sort(key=lambda item: item.path.name == "test_ray.py")  # stable: every other order is kept


def randomise_thinking_parts(model: ThinkingLM, seed: int = 1, scale: float = 0.3) -> None:
    """Give the mixing head a non-zero output layer and distinct meta tokens, so tests see every path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.mixing_head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        model.start_embedding.add_(torch.randn(model.start_embedding.shape, generator=gen) * 0.5)
        model.end_embedding.add_(torch.randn(model.end_embedding.shape, generator=gen) * 0.5)


def make_model(family: str, num_thoughts=3, length=3, talk_length=2, randomise=True, **kw) -> ThinkingLM:
    model = ThinkingLM(tiny_lm(family), ThoughtConfig(num_thoughts, length, talk_length, init_token_id=5, **kw))
    if randomise:
        randomise_thinking_parts(model)
    return model


def padded_batch(seq_len: int = 37, lengths=(37, 29), vocab: int = 97, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), seq_len), generator=gen)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
        ids[b, n:] = 0
    return ids, mask


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param
