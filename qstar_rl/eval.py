"""Zero-shot evaluation with thoughts: the paper's answer probability and exact-match generation accuracy,
each with and without thinking.

    qstar-rl eval --checkpoint runs/default --task gsm_symbolic --limit 200        # offline (reasoning-gym)
    qstar-rl eval --checkpoint exported/ --task gsm8k                               # from the hub
    qstar-rl eval --checkpoint smollm2-135m --task commonsenseqa --data csqa.jsonl  # a local file, same fields
    qstar-rl eval --checkpoint runs/default --task gsm8k --protocol paper          # the authors' protocol

Two protocols (--protocol):
- default: the prompt "Question: ...\\n[A. choice\\n...]Answer:" followed by the target " <answer>" (prompt
  and answer tokenised separately). answer_prob: probability of the exact answer string, teacher-forced, with
  a greedy thought before every answer token, each token's distribution restricted to the valid answer
  tokens (number-spelling tokens for numeric answers, the choice labels for multiple choice; no restriction
  for free-text answers).
- paper: the Quiet-STaR authors' zero-shot protocol. The text "Q: ...\\n[(A) choice\\n...]A: <answer>\\n" is
  tokenised as one string; the answer starts after "A:" (a separate leading space token is read, not
  scored); each answer token's distribution is restricted to the 10 digit tokens + "\\n" (numeric answers)
  or the letters A-E + "\\n" (multiple choice), and the closing "\\n" is scored too, so "1" gets no credit
  where the model goes on to "12". Other tokens of a numeric answer ("-", ",", ".") are read, not scored,
  as the authors do. Free-text answers: no restriction.
answer_prob_full: the same answer tokens over the whole vocabulary.
- exact_match: greedy generation (a thought before every token) whose answer, extracted from the text
  (first number / first choice label / first line), equals the reference.
Each has a `_no_think` twin from the same model's base prediction, so one run shows what thinking adds.
"""

import argparse
import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qstar_rl.config import EVAL_PROTOCOLS, EvalConfig
from qstar_rl.core.mixing import restricted_token_logprobs, token_logprobs
from qstar_rl.engine import keep_freed_memory_for_reuse
from qstar_rl.generate import ThinkingDecoder, generate, load_for_generation
from qstar_rl.model import ThinkingLM

HUB_TASKS = {
    "gsm8k": ("openai/gsm8k", "main", "test"),
    "commonsenseqa": ("tau/commonsense_qa", None, "validation"),
}
"""Hub tasks: name -> (dataset, config, split). Every other task name is a reasoning-gym generator."""

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NUMBER_TOKEN = re.compile(r" ?[-+]?\d*[.,]?\d*")
PAPER_LETTERS = "ABCDE"
"""The choice labels whose tokens the paper protocol restricts multiple-choice answers to (CommonsenseQA's)."""


@dataclass
class EvalItem:
    """One question with its reference answer."""

    question: str
    """The question text."""
    answer: str
    """The exact answer string ("288", "B", "cat")."""
    choices: list[tuple[str, str]] = field(default_factory=list)
    """(label, text) pairs for multiple choice; empty otherwise."""


# ---- tasks ---------------------------------------------------------------------------------------------


def gsm8k_item(record: dict) -> EvalItem:
    """GSM8K schema: question, answer = worked solution ending in '#### 42'."""
    final = record["answer"].rsplit("####", 1)[-1]
    return EvalItem(record["question"].strip(), final.strip().replace(",", ""))


def commonsenseqa_item(record: dict) -> EvalItem:
    """CommonsenseQA schema: question, choices = {label: [...], text: [...]}, answerKey."""
    choices = list(zip(record["choices"]["label"], record["choices"]["text"], strict=True))
    return EvalItem(record["question"].strip(), record["answerKey"].strip(), choices)


def _hub_or_file(task: str, data_file: str | None):
    import datasets

    if data_file is not None:
        kind = "parquet" if data_file.endswith(".parquet") else "json"
        return datasets.load_dataset(kind, data_files=data_file, split="train")
    name, config, split = HUB_TASKS[task]
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # offline, gated, renamed: say what to do instead of a deep stack
        raise RuntimeError(
            f"could not load {name} ({split}) from the hub: {type(err).__name__}: {err}. "
            f"On a machine without the hub, pass --data FILE (JSON lines or parquet with the same fields)."
        ) from err


def known_tasks() -> list[str]:
    """The hub tasks, then every reasoning-gym generator."""
    from reasoning_gym.factory import DATASETS

    return [*HUB_TASKS, *sorted(DATASETS)]


def task_problems(tasks: list[str]) -> list[str]:
    """eval.tasks that no loader knows."""
    known = known_tasks() if tasks else []
    example = "e.g. gsm8k, commonsenseqa, gsm_symbolic"
    return [f"eval.tasks: unknown task {task!r} ({example})" for task in tasks if task not in known]


def load_task(task: str, limit: int | None = None, seed: int = 0, data_file: str | None = None) -> list[EvalItem]:
    """The first `limit` items of a task: gsm8k / commonsenseqa (hub or a local file with their fields), or
    any reasoning-gym generator name (gsm_symbolic, basic_arithmetic, ...: generated offline, `limit` items,
    default 200, from `seed`)."""
    if task in HUB_TASKS:
        records = _hub_or_file(task, data_file)
        if limit is not None:
            records = records.select(range(min(limit, len(records))))
        to_item = gsm8k_item if task == "gsm8k" else commonsenseqa_item
        return [to_item(record) for record in records]
    import reasoning_gym

    if task not in known_tasks():
        raise ValueError(f"unknown task {task!r}; known: {', '.join(known_tasks())}")
    dataset = reasoning_gym.create_dataset(task, size=limit or 200, seed=seed)
    return [EvalItem(entry["question"].strip(), str(entry["answer"]).strip()) for entry in dataset]


def prompt_text(item: EvalItem) -> str:
    """The default protocol's prompt: "Question: ...\\n[A. choice\\n...]Answer:"."""
    choices = "".join(f"{label}. {text}\n" for label, text in item.choices)
    return f"Question: {item.question}\n{choices}Answer:"


def paper_prompt_text(item: EvalItem) -> str:
    """The paper protocol's prompt: "Q: ...\\n[(A) choice\\n...]A: ", the answer follows the space."""
    choices = "".join(f"({label}) {text}\n" for label, text in item.choices)
    return f"Q: {item.question}\n{choices}A: "


def _is_number(text: str) -> bool:
    return _NUMBER.fullmatch(text.strip()) is not None


def answer_vocabulary(tokenizer, items: list[EvalItem]) -> torch.Tensor | None:
    """The valid answer tokens that the paper's metric restricts each answer token's softmax to: the tokens
    spelling the choice labels for multiple choice; every token that can spell a number (an optional
    leading space, sign, digits, one separator) for numeric answers; None (the whole vocabulary) for
    free-text answers. The reference answers' own tokens are always included."""
    if all(item.choices for item in items):
        labels = {label for item in items for label, _ in item.choices}
        ids = {t for label in labels for t in tokenizer.encode(" " + label, add_special_tokens=False)}
    elif all(_is_number(item.answer) for item in items):
        vocab = len(tokenizer)
        ids = {i for i in range(vocab) if (text := tokenizer.decode([i])) and _NUMBER_TOKEN.fullmatch(text)}
    else:
        return None
    ids |= {t for item in items for t in tokenizer.encode(" " + item.answer, add_special_tokens=False)}
    return torch.tensor(sorted(ids))


def split_joint(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokenise prompt + answer as one string, as the authors do, and split the ids where the answer starts:
    (context ids, answer ids); context + answer is exactly the joint tokenisation.

    Tokenising the two strings separately is not the same thing for every tokenizer: a SentencePiece-style
    tokenizer (Llama-2, Mistral) puts a "▁" in front of every string it encodes, so " 72" alone gives an
    extra "▁", and any BPE merge may cross the boundary. Byte-level BPE (GPT-2, SmolLM2) pre-splits at the
    space and happens to give the same ids. The split uses the character offsets of the joint tokens: a token
    belongs to the answer when it ends after the prompt. One that starts inside the prompt may only cover the
    prompt's trailing whitespace (" B", "▁7" carry the space after "A:"); a separate space token (SmolLM2's
    " ", Mistral's "▁") ends with the prompt, so it stays in the context: read, not scored."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the paper protocol needs a fast tokenizer (character offsets of the joint tokens)")
    encoded = tokenizer(prompt + answer, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundary = len(prompt)
    inside = [i for i, (_, end) in enumerate(offsets) if end > boundary]  # special tokens have (0, 0): context
    if not inside or inside != list(range(inside[0], inside[-1] + 1)):
        raise ValueError(f"cannot find the answer {answer!r} in the tokens of {prompt + answer!r}")
    start = offsets[inside[0]][0]
    if prompt[start:boundary].strip():
        raise ValueError(f"the tokenizer merges the end of the prompt {prompt[start:]!r} with the answer {answer!r}")
    return ids[: inside[0]], ids[inside[0] : inside[-1] + 1]


def paper_vocabulary(tokenizer, spellings: list[str]) -> torch.Tensor:
    """The paper protocol's restricted vocabulary: the tokens that spell each character of `spellings`
    (the digits, or the choice letters) right after "A: " in the joint tokenisation, plus the "\\n" token
    that ends an answer. Found by tokenising those answers in context, so the ids are the ones real answers
    use (Mistral: "7", "▁B", "<0x0A>"; SmolLM2: "7", " B", "\\n"); the authors list the same ids by hand.
    Refuses tokenizers that write several digits (or a label) as one token: the protocol is not defined there."""
    ids: set[int] = set()
    for spelling in spellings:
        _, tokens = split_joint(tokenizer, "Q: ?\nA: ", spelling + "\n")
        pieces = [tokenizer.decode([t]) for t in tokens]
        if [piece.strip() for piece in pieces[:-1]] != list(spelling) or pieces[-1] != "\n":
            raise ValueError(
                f"the paper protocol needs one token per character of {spelling!r} and a separate newline; "
                f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} writes {spelling + chr(10)!r} as {pieces}"
            )
        ids.update(tokens)
    return torch.tensor(sorted(ids))


@dataclass
class ForcedAnswer:
    """One item as token ids for teacher forcing under a protocol."""

    prompt: list[int]
    """What the model reads before the first answer token (generation for exact match starts here too)."""
    answer: list[int]
    """The answer tokens, appended one at a time; each is predicted after a thought."""
    scored: list[bool]
    """Which answer tokens count in the restricted answer_prob (the paper protocol reads "-", "," and "." of a
    number without scoring them); answer_prob_full counts them all."""
    vocabulary: torch.Tensor | None
    """Token ids the restricted softmax runs over; None: the whole vocabulary."""


def default_answers(tokenizer, items: list[EvalItem]) -> list[ForcedAnswer]:
    """The default protocol: prompt_text and " <answer>" tokenised separately, one vocabulary for all items."""
    vocabulary = answer_vocabulary(tokenizer, items)
    forced = []
    for item in items:
        answer = tokenizer.encode(" " + item.answer, add_special_tokens=False)
        forced.append(ForcedAnswer(tokenizer.encode(prompt_text(item)), answer, [True] * len(answer), vocabulary))
    return forced


def paper_answers(tokenizer, items: list[EvalItem]) -> list[ForcedAnswer]:
    """The paper protocol: paper_prompt_text + "<answer>\\n" tokenised jointly and split (split_joint); numeric
    answers restricted to the digit tokens + "\\n", multiple choice to the letters A-E (and any other label
    the items use) + "\\n", free-text answers unrestricted. Chosen per item, as the authors do."""
    labels = sorted(set(PAPER_LETTERS) | {label for item in items for label, _ in item.choices})
    vocabularies: dict[str, torch.Tensor] = {}  # built once per kind, only for the kinds the items need
    forced = []
    for item in items:
        context, answer = split_joint(tokenizer, paper_prompt_text(item), item.answer + "\n")
        if item.choices:
            vocabulary = vocabularies.get("choice")
            if vocabulary is None:
                vocabulary = vocabularies["choice"] = paper_vocabulary(tokenizer, labels)
        elif _is_number(item.answer):
            vocabulary = vocabularies.get("number")
            if vocabulary is None:  # every digit first after "A: " and inside a number
                vocabulary = vocabularies["number"] = paper_vocabulary(tokenizer, ["0123456789", *"0123456789"])
        else:
            vocabulary = None
        allowed = set(vocabulary.tolist()) if vocabulary is not None else None
        scored = [allowed is None or token in allowed for token in answer]
        forced.append(ForcedAnswer(context, answer, scored, vocabulary))
    return forced


def forced_answers(tokenizer, items: list[EvalItem], protocol: str = "default") -> list[ForcedAnswer]:
    """The items as token ids for teacher forcing under `protocol` (config.EVAL_PROTOCOLS)."""
    if protocol == "default":
        return default_answers(tokenizer, items)
    if protocol == "paper":
        return paper_answers(tokenizer, items)
    raise ValueError(f"unknown evaluation protocol {protocol!r}; known: {', '.join(EVAL_PROTOCOLS)}")


def extract_answer(item: EvalItem, generated: str) -> str:
    """The answer inside generated text: first number (numeric answers), first choice label (multiple
    choice), else the first line without a final full stop."""
    if item.choices:
        labels = "|".join(re.escape(label) for label, _ in item.choices)
        found = re.search(rf"\b({labels})\b", generated)
        return found.group(1) if found else ""
    if _is_number(item.answer):
        found = _NUMBER.search(generated)
        return _normalise_number(found.group(0)) if found else ""
    lines = generated.strip().splitlines()
    return lines[0].strip().rstrip(".") if lines else ""


def _normalise_number(text: str) -> str:
    value = float(text.replace(",", ""))
    return str(int(value)) if value.is_integer() else repr(value)


def is_correct(item: EvalItem, generated: str) -> bool:
    reference = _normalise_number(item.answer) if _is_number(item.answer) and not item.choices else item.answer
    return extract_answer(item, generated).lower() == reference.lower()


# ---- metrics ------------------------------------------------------------------------------------------


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids, attention_mask (B, P), left-padded."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(sequences):
        ids[b, width - len(seq) :] = torch.tensor(seq)
        mask[b, width - len(seq) :] = 1
    return ids, mask


Vocabulary = torch.Tensor | None
"""Token ids a restricted softmax runs over (A,); None: the whole vocabulary."""


def _restricted_logprobs(
    logits: torch.Tensor, gold: torch.Tensor, whole: torch.Tensor, vocabulary: Vocabulary | list[Vocabulary]
) -> torch.Tensor:
    """(N,) log p(gold) with each row's softmax restricted to its vocabulary: one for all rows, or one per row
    (rows sharing a vocabulary object are computed together). `whole` (N,) is the unrestricted answer."""
    if isinstance(vocabulary, list) and all(v is vocabulary[0] for v in vocabulary):
        vocabulary = vocabulary[0]  # one vocabulary for the batch (the default protocol): one call, as before
    if not isinstance(vocabulary, list):
        return whole if vocabulary is None else restricted_token_logprobs(logits, gold, vocabulary.to(logits.device))
    groups: dict[int, list[int]] = {}
    for row, vocab in enumerate(vocabulary):
        if vocab is not None:
            groups.setdefault(id(vocab), []).append(row)
    picked = whole
    for rows in groups.values():
        index = torch.tensor(rows, device=logits.device)
        allowed = vocabulary[rows[0]].to(logits.device)
        picked = picked.index_copy(0, index, restricted_token_logprobs(logits[index], gold[index], allowed))
    return picked


@torch.no_grad()
def answer_logprobs(
    model: ThinkingLM,
    prompts: list[list[int]],
    answers: list[list[int]],
    vocabulary: Vocabulary | list[Vocabulary],
    think: bool,
    pad_id: int,
    scored: list[list[bool]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(answer | prompt), teacher-forced, a greedy thought before every answer token when `think`:
    over the whole vocabulary, and restricted to `vocabulary` (one for all, or one per item; None: the whole
    vocabulary) summed over the answer tokens that `scored` marks (None: all), (N,) each."""
    device = model.start_embedding.device
    input_ids, attention_mask = left_pad(prompts, pad_id)
    decoder = ThinkingDecoder(model, input_ids.to(device), attention_mask.to(device))
    full = torch.zeros(len(prompts), device=device)
    restricted = torch.zeros(len(prompts), device=device)
    for k in range(max(len(a) for a in answers)):
        present = torch.tensor([k < len(a) for a in answers], device=device)  # (N,)
        gold = torch.tensor([a[k] if k < len(a) else pad_id for a in answers], device=device)  # (N,)
        counted = present if scored is None else torch.tensor([k < len(s) and s[k] for s in scored], device=device)
        logits = decoder.predict(think=think, greedy_thoughts=True).logits  # (N, V)
        whole = token_logprobs(logits, gold)  # (N,)
        full += torch.where(present, whole, 0.0)
        restricted += torch.where(counted, _restricted_logprobs(logits, gold, whole, vocabulary), 0.0)
        decoder.append(gold)
    return full, restricted


def evaluate(
    model: ThinkingLM,
    tokenizer,
    items: list[EvalItem],
    batch_size: int = 8,
    max_new_tokens: int = 16,
    generation: bool = True,
    progress: Callable | None = None,
    protocol: str = "default",
) -> list[dict]:
    """One record per item with answer_prob(_full) and, when `generation`, exact_match and the generated
    text, each with and without thinking (`_no_think`), under `protocol` (default or paper, see the module
    docstring). `progress(n)` is called after each batch."""
    was_training = model.training
    model.eval()
    forced = forced_answers(tokenizer, items, protocol)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.start_embedding.device
    records = []
    for start in range(0, len(items), batch_size):
        batch, chunk = items[start : start + batch_size], forced[start : start + batch_size]
        prompts, answers = [f.prompt for f in chunk], [f.answer for f in chunk]
        vocabularies, scored = [f.vocabulary for f in chunk], [f.scored for f in chunk]
        rows = [{"question": item.question, "answer": item.answer} for item in batch]
        for think, suffix in ((True, ""), (False, "_no_think")):
            full, restricted = answer_logprobs(model, prompts, answers, vocabularies, think, pad_id, scored)
            for row, f, r in zip(rows, full.tolist(), restricted.tolist(), strict=True):
                row[f"answer_prob{suffix}"], row[f"answer_prob_full{suffix}"] = math.exp(r), math.exp(f)
            if not generation:
                continue
            input_ids, attention_mask = left_pad(prompts, pad_id)
            out = generate(
                model,
                input_ids.to(device),
                max_new_tokens,
                think=think,
                eos_token_id=tokenizer.eos_token_id,
                attention_mask=attention_mask.to(device),
            )
            for row, item, tokens in zip(rows, batch, out.tokens.tolist(), strict=True):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                row[f"generated{suffix}"] = text
                row[f"exact_match{suffix}"] = float(is_correct(item, text))
        records.extend(rows)
        if progress is not None:
            progress(len(batch))
    model.train(was_training)
    return records


def metric_names(generation: bool) -> list[str]:
    """The per-item metrics that `evaluate` records."""
    names = ["answer_prob", "answer_prob_full", *(["exact_match"] if generation else [])]
    return [f"{name}{suffix}" for suffix in ("", "_no_think") for name in names]


def summarize(records: list[dict], generation: bool = True) -> dict[str, float]:
    """Mean of every metric over the items."""
    return {name: sum(r[name] for r in records) / len(records) for name in metric_names(generation)}


def periodic_eval(
    model: ThinkingLM,
    tokenizer,
    config: EvalConfig,
    full_weights: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """eval/<task>/<metric> over config.tasks, during training, with the gathered weights.

    Every rank must call it at once and evaluates every item: ZeRO-3's module hooks all-gather weights
    inside each forward, so all ranks must run the same forwards in the same order. Splitting the items
    would give ranks different answer lengths and early stops, i.e. mismatched collectives (a hang or
    a gloo size error)."""
    files = dict(entry.split("=", 1) for entry in config.files)
    metrics: dict[str, float] = {}
    started = time.perf_counter()
    with full_weights() if full_weights is not None else contextlib.nullcontext():
        for task in config.tasks:
            items = load_task(task, config.limit, config.seed, files.get(task))
            records = evaluate(
                model,
                tokenizer,
                items,
                config.batch_size,
                config.max_new_tokens,
                config.generation,
                protocol=config.protocol,
            )
            metrics.update({f"eval/{task}/{k}": v for k, v in summarize(records, config.generation).items()})
    metrics["time/eval"] = time.perf_counter() - started
    return metrics


def eval_due(config: EvalConfig, step: int, total_steps: int) -> bool:
    """Whether optimizer step `step` (1-based) ends with an evaluation."""
    return bool(config.tasks and config.every_steps) and (step % config.every_steps == 0 or step == total_steps)


# ---- `qstar-rl eval` ----------------------------------------------------------------------------------


def default_output(checkpoint: str, task: str) -> Path:
    """<run or model folder>/eval/<task>.json for a folder, eval/<model name>/<task>.json for a name."""
    path = Path(checkpoint)
    folder = path if path.is_dir() else Path("eval") / checkpoint.replace("/", "_")
    return (folder / "eval" if path.is_dir() else folder) / f"{task}.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qstar-rl eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", default="smollm2-135m", help="exported folder, run directory, checkpoint folder or model name"
    )
    parser.add_argument("--task", required=True, help="gsm8k, commonsenseqa, or a reasoning-gym task (gsm_symbolic)")
    parser.add_argument("--limit", type=int, default=None, help="first N items (reasoning-gym: N generated, 200)")
    parser.add_argument("--data", default=None, help="local JSON-lines / parquet file instead of the hub")
    parser.add_argument("--seed", type=int, default=0, help="seed of reasoning-gym's generator")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length for exact match")
    parser.add_argument("--no-generation", action="store_true", help="answer probability only (faster)")
    parser.add_argument("--thought-length", type=int, default=8, help="M for a model name (untrained thinking)")
    parser.add_argument(
        "--protocol",
        choices=EVAL_PROTOCOLS,
        default="default",
        help="default: 'Question: ...\\nAnswer:' prompt; paper: the Quiet-STaR authors' 'Q: ...\\nA: ' protocol",
    )
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: <checkpoint>/eval/<task>.json)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    keep_freed_memory_for_reuse()

    try:
        items = load_task(args.task, args.limit, args.seed, args.data)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"qstar-rl eval: {err}", file=sys.stderr)
        return 2
    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer = load_for_generation(args.checkpoint, args.thought_length)
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(total=len(items), desc=f"eval {args.task}", unit="item", file=sys.stderr) as bar:
        records = evaluate(
            model,
            tokenizer,
            items,
            args.batch_size,
            args.max_new_tokens,
            not args.no_generation,
            bar.update,
            protocol=args.protocol,
        )
    seconds = time.perf_counter() - started
    metrics = summarize(records, not args.no_generation)
    out = args.out or default_output(args.checkpoint, args.task)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "task": args.task,
        "protocol": args.protocol,
        "checkpoint": args.checkpoint,
        "items": len(records),
        "seed": args.seed,
        "thought": asdict(model.thought),
        "seconds": seconds,
        "metrics": metrics,
        "records": records,
    }
    out.write_text(json.dumps(result, indent=2))
    for name, value in metrics.items():
        print(f"{args.task}/{name}: {value:.4f}")
    print(f"{len(records)} items in {seconds:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
