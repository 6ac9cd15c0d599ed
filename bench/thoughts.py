"""Benchmark of the thinking model: parallel thought sampling vs a naive loop, and `score` cost vs M and T.

    python bench/thoughts.py                 # full run (CPU: ~10 min on 2 cores), writes bench/results/thoughts.json
    python bench/thoughts.py --quick         # small sizes, for a smoke test

1. Sampling: `ThinkingLM.sample_thoughts` (one text pass, then M steps over all B*R*T branches) against
   a naive loop that, for each position i separately, prefills x_0..x_i with a KV cache and decodes the R
   thoughts of that position step by step (HF cached decoding). Greedy in both, and the tokens must match.
2. Scoring: peak memory and wall time of `score` forward + backward for M in {4, 8, 16} and T in
   {64, 128, 256}. Each point runs in a fresh subprocess; on CPU the peak is the peak resident set size
   above the level before the step (glibc is told to return large blocks to the OS), on GPU it is
   torch.cuda.max_memory_allocated.
"""

import argparse
import json
import time

import torch
import transformers
from common import RESULTS, peak, print_table, reset_peak, run_point, write_results

from qstar_rl.config import ThoughtConfig
from qstar_rl.loading import SMOLLM2, load_lm, tiny_lm
from qstar_rl.model import ThinkingLM


def naive_sample(model: ThinkingLM, input_ids: torch.Tensor) -> torch.Tensor:
    """(1, T) -> greedy thoughts (1, R, T, M), one position at a time with an ordinary KV cache."""
    lm, thought = model.lm, model.thought
    emb = lm.get_input_embeddings()
    seq_len, num_thoughts = input_ids.shape[1], thought.num_thoughts
    out = torch.empty(1, num_thoughts, seq_len, thought.length, dtype=torch.long)
    for i in range(seq_len):
        prefix = torch.cat([emb(input_ids[0, : i + 1]), model.start_embedding[None].to(emb.weight.dtype)])
        embeds = prefix.unsqueeze(0).expand(num_thoughts, -1, -1)  # the R thoughts of position i, batched
        cache = transformers.DynamicCache(config=lm.config)
        positions = torch.arange(i + 2).expand(num_thoughts, -1)
        for m in range(thought.length):
            hidden = lm.base_model(
                inputs_embeds=embeds, position_ids=positions, past_key_values=cache, use_cache=True
            ).last_hidden_state
            token = model.logits(hidden[:, -1]).argmax(dim=-1)  # (R,)
            out[0, :, i, m] = token
            embeds = emb(token)[:, None]
            positions = positions[:, -1:] + 1
    return out


def timed(fn, repeats: int, warmup: bool = True):
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def bench_sampling(name: str, model: ThinkingLM, seq_len: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    vocab = model.lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (1, seq_len), generator=gen)
    with torch.no_grad():
        t_parallel, (parallel_ids, _) = timed(lambda: model.sample_thoughts(ids, greedy=True), repeats)
        t_naive, naive_ids = timed(lambda: naive_sample(model, ids), 1, warmup=False)  # slow: one run
    same = torch.equal(parallel_ids, naive_ids)
    agree = (parallel_ids == naive_ids).float().mean().item()
    thought = model.thought
    return {
        "model": name,
        "T": seq_len,
        "R": thought.num_thoughts,
        "M": thought.length,
        "parallel_s": t_parallel,
        "naive_s": t_naive,
        "speedup": t_naive / t_parallel,
        "same_tokens": same,
        "token_agreement": agree,
    }


def smollm2_shaped(num_layers: int) -> transformers.PreTrainedModel:
    """Random weights in SmolLM2-135M's shape (D=576, 9/3 heads, V=49152) with fewer layers."""
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def score_point(spec: dict) -> dict:
    """One forward + backward of `score` (runs inside a fresh subprocess)."""
    torch.set_num_threads(spec["threads"])
    lm = smollm2_shaped(spec["layers"]) if spec["model"] == "smollm2-shaped" else tiny_lm("llama")
    cuda = torch.cuda.is_available()
    thought = ThoughtConfig(
        spec["R"], spec["M"], spec["K"], attention=spec["attention"], logits_chunk_tokens=spec["chunk"]
    )
    model = ThinkingLM(lm, thought).to("cuda" if cuda else "cpu")
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (spec["B"], spec["T"]), generator=torch.Generator().manual_seed(0))
    thoughts = torch.randint(3, vocab, (spec["B"], spec["R"], spec["T"], spec["M"]))
    ids, thoughts = ids.to(model.start_embedding.device), thoughts.to(model.start_embedding.device)
    for p in model.parameters():  # gradients allocated before measuring: they are not activation memory
        p.grad = torch.zeros_like(p)
    base = reset_peak()
    start = time.perf_counter()
    out = model.score(ids, thoughts)
    loss = -(out.talk_logprobs.sum() + out.policy_logprobs.sum() + out.base_logprobs.sum())
    loss.backward()
    growth = peak() - base  # synchronises the device before the clock stops
    seconds = time.perf_counter() - start
    branch_tokens = spec["B"] * spec["R"] * spec["T"] * (spec["M"] + spec["K"] + 1)
    return {**spec, "branch_tokens": branch_tokens, "peak_mib": growth / 2**20, "fwd_bwd_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "thoughts.json"))
    args = parser.parse_args()
    if args.point:
        print(json.dumps(score_point(json.loads(args.point))))
        return
    threads = torch.get_num_threads()

    sampling = []
    tiny = ThinkingLM(tiny_lm("llama"), ThoughtConfig(2, 8 if not args.quick else 3, 4, init_token_id=5))
    sampling.append(bench_sampling("tiny-llama", tiny, 128 if not args.quick else 16, 3))
    if not args.quick:
        lm, tokenizer = load_lm(SMOLLM2)
        smol = ThinkingLM(lm, ThoughtConfig(2, 8, 4), tokenizer=tokenizer)
        sampling.append(bench_sampling("smollm2-135m", smol, 32, 2))
        sampling.append(bench_sampling("smollm2-135m", smol, 128, 1))
    print_table(
        "sample_thoughts (greedy, B=1): parallel vs naive per-position cached decoding",
        sampling,
        ["model", "T", "R", "M", "parallel_s", "naive_s", "speedup", "same_tokens"],
    )

    base = {
        "model": "smollm2-shaped",
        "layers": 4,
        "B": 1,
        "R": 2,
        "K": 4,
        "attention": "efficient",
        "chunk": 0,
        "threads": threads,
    }
    if args.quick:
        base.update(model="tiny-llama", layers=2)
        grid = [{"M": 2, "T": 16}, {"M": 4, "T": 16}, {"M": 4, "T": 32}]
    else:
        grid = [{"M": m, "T": 128} for m in (4, 8, 16)] + [{"M": 8, "T": t} for t in (64, 256)]
        grid += [{"M": m, "T": 128, "chunk": 512} for m in (4, 8, 16)]
        grid += [{"M": m, "T": 64, "attention": "dense"} for m in (4, 8)]
    scoring = [run_point(__file__, {**base, **point}) for point in grid]
    scoring.sort(key=lambda r: (r["attention"], r["chunk"], r["T"], r["M"]))
    print_table(
        f"score forward+backward ({base['model']}, {base['layers']} layers, R=2, K=4, B=1)",
        scoring,
        ["attention", "chunk", "T", "M", "branch_tokens", "peak_mib", "fwd_bwd_s"],
    )
    growth = []
    for row in scoring:
        for other in scoring:
            same = (other["attention"], other["chunk"], other["T"]) == (row["attention"], row["chunk"], row["T"])
            if same and other["M"] == 2 * row["M"]:
                growth.append(
                    {
                        "attention": row["attention"],
                        "chunk": row["chunk"],
                        "T": row["T"],
                        "M": f"{row['M']}->{other['M']}",
                        "token_ratio": other["branch_tokens"] / row["branch_tokens"],
                        "memory_ratio": other["peak_mib"] / row["peak_mib"],
                        "time_ratio": other["fwd_bwd_s"] / row["fwd_bwd_s"],
                    }
                )
    for g in growth:
        g["memory_vs_tokens"] = g["memory_ratio"] / g["token_ratio"]
    print_table(
        "growth when M doubles (target: memory_vs_tokens <= 1.15)",
        growth,
        ["attention", "chunk", "T", "M", "token_ratio", "memory_ratio", "memory_vs_tokens", "time_ratio"],
    )

    write_results(args.out, quick=args.quick, sampling=sampling, scoring=scoring, growth=growth)


if __name__ == "__main__":
    main()
