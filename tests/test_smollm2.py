"""The thinking model on the real pretrained SmolLM2-135M (Llama, 9 query / 3 KV heads, tied embeddings)."""

import pytest
import torch
from conftest import randomise_thinking_parts
from reference import reference_branch

from qstar_rl.config import ThoughtConfig
from qstar_rl.loading import SMOLLM2, load_lm
from qstar_rl.model import ThinkingLM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    lm, tokenizer = load_lm(SMOLLM2)
    return lm, tokenizer


def test_real_model_matches_reference_and_thinks_from_dashes(smollm2):
    lm, tokenizer = smollm2
    model = ThinkingLM(lm, ThoughtConfig(num_thoughts=2, length=3, talk_length=2), tokenizer=tokenizer)
    dash = tokenizer.encode("---", add_special_tokens=False)[0]
    assert torch.equal(model.start_embedding.data, lm.get_input_embeddings().weight[dash])
    randomise_thinking_parts(model, scale=0.02)  # mixing weights of order 0.1 on a 576-wide model
    text = ["Tom has 3 apples and buys 4 more, so he has", "The sum of 12 and 9 is"]
    batch = tokenizer(text, return_tensors="pt", padding=True)
    ids, mask = batch.input_ids, batch.attention_mask
    assert mask[1].sum() < mask[0].sum(), "the second row is right-padded"
    thought_ids, sampled_lp = model.sample_thoughts(ids, mask, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.score(ids, thought_ids, mask)
        real = mask.bool()[:, None, :].expand(-1, 2, -1)
        torch.testing.assert_close(sampled_lp[real], out.thought_logprobs[real], atol=2e-4, rtol=0)
        for b, i, r in [(0, 0, 0), (0, 5, 1), (1, 3, 0), (1, int(mask[1].sum()) - 3, 1)]:
            thought_lp, talk_lp, weight = reference_branch(model, ids, thought_ids, b, r, i)
            assert out.valid[b, i]
            torch.testing.assert_close(out.thought_logprobs[b, r, i], thought_lp, atol=2e-4, rtol=0)
            torch.testing.assert_close(out.talk_logprobs[b, r, i], talk_lp, atol=2e-4, rtol=0)
            torch.testing.assert_close(out.mixing_weight[b, r, i], weight, atol=2e-4, rtol=0)
        assert 1e-3 < out.mixing_weight[out.valid[:, None].expand(-1, 2, -1)].abs().mean() < 1.0
