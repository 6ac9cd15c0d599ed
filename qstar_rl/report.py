"""`qstar-rl report`: where and whether thinking helps, as tables, PNG plots and one self-contained HTML page.

    qstar-rl report --checkpoint runs/default --baseline smollm2-135m     # -> runs/default/report/
    qstar-rl report --checkpoint exported/ --text held_out.txt --out report/

On held-out text (a file, or by default worked solutions of reasoning-gym's gsm_symbolic: offline math text
that the default run never trains on) every position gets a greedy thought; for each token we compare
the NLL of predicting it after the thought (mixed) with the NLL without thinking (the same model's base
prediction, or the `--baseline` model's). Outputs:
- difficult_tokens.{md,json,png}: the change in NLL by decile of base NLL (the paper's "thoughts help
  difficult tokens most" analysis);
- curves.png: reward, its within-position variance, mixing weight, NLLs and eval metrics from metrics.jsonl;
- index.html: the text with each token coloured by how much the thought before it helped (green: lower
  NLL), the thought on hover, and both plots inlined; no external resource.
"""

import argparse
import base64
import contextlib
import dataclasses
import html
import io
import json
import sys
from pathlib import Path

import torch

from qstar_rl.core.analysis import difficulty_deciles
from qstar_rl.core.mixing import token_logprobs
from qstar_rl.model import ThinkingLM


@dataclasses.dataclass
class TokenEffects:
    """Per-token effect of thinking on a batch of windows; position i is about predicting x_{i+1}."""

    input_ids: torch.Tensor
    """(B, T) the text."""
    predicted: torch.Tensor
    """(B, T) bool: x_{i+1} exists and is real, so position i predicts something."""
    base_nll: torch.Tensor
    """(B, T) -log p(x_{i+1}) without thinking (the baseline model's when one is given)."""
    think_nll: torch.Tensor
    """(B, T) -log p(x_{i+1}) after the greedy thought at i, mixed."""
    weight: torch.Tensor
    """(B, T) the mixing weight at i."""
    thoughts: torch.Tensor
    """(B, T, M) the greedy thought at i."""


@torch.no_grad()
def token_effects(
    model: ThinkingLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, baseline: ThinkingLM | None = None
) -> TokenEffects:
    """Greedy thoughts at every position (one per position: R = 1) and the NLLs with and without them."""
    was_training, saved = model.training, model.thought
    model.eval()
    model.thought = dataclasses.replace(saved, num_thoughts=1)
    try:
        thoughts, _ = model.sample_thoughts(input_ids, attention_mask, greedy=True)  # (B, 1, T, M)
        scored = model.score(input_ids, thoughts, attention_mask)
    finally:
        model.thought = saved
        model.train(was_training)
    predicted = torch.zeros_like(attention_mask, dtype=torch.bool)
    predicted[:, :-1] = attention_mask[:, 1:].bool()
    base_logprobs = scored.base_logprobs
    if baseline is not None:  # a plain forward of the other model: log p_baseline(x_{i+1})
        logits = baseline.lm.eval()(input_ids=input_ids, attention_mask=attention_mask).logits.float()  # (B, T, V)
        base_logprobs = torch.zeros_like(scored.base_logprobs)
        base_logprobs[:, :-1] = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return TokenEffects(
        input_ids,
        predicted,
        -base_logprobs,
        -scored.talk_logprobs[:, 0, :, 0],
        scored.mixing_weight[:, 0, :, 0],
        thoughts[:, 0],
    )


def held_out_text(task: str = "gsm_symbolic", items: int = 40, seed: int = 1234) -> str:
    """Worked solutions of a reasoning-gym task (question, then the step-by-step answer) from the held-out
    split of `qstar_rl.corpus`: for gsm_symbolic, templates that the "math" data source never trains on."""
    from qstar_rl.corpus import task_documents

    return "\n".join(task_documents(task, "heldout", items, seed))


def heldout_windows(source: str, tokenizer, seq_len: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` windows of `seq_len` tokens of an offline corpus (a held-out split), its documents in a fixed
    shuffled order (so that the windows mix its kinds of text), the same for every model measured."""
    import random

    from qstar_rl.data import offline_documents

    documents = offline_documents(source)
    if documents is None:
        raise ValueError(f"{source!r} is not an offline corpus (e.g. math-heldout, wiki-heldout)")
    random.Random(0).shuffle(documents)
    return windows(tokenizer, "\n".join(documents), seq_len, count)


def trend(values: list[float]) -> tuple[float, float]:
    """(mean of the first quarter, mean of the last quarter) of a curve: how it moved over a run."""
    quarter = max(1, len(values) // 4)
    return sum(values[:quarter]) / quarter, sum(values[-quarter:]) / quarter


def end_of_run_report(run_dir: Path, source: str, seq_len: int, count: int) -> list[str]:
    """What the main job prints when it finishes: on `count` held-out windows, the NLL with a thought before
    every token and without, on all tokens and on the hardest decile (of the NLL without); how the reward and
    the mixing weight moved over the run; the HTML report it wrote (run_dir/report/index.html)."""
    from qstar_rl.export import load_checkpoint

    model, tokenizer = load_checkpoint(run_dir)
    input_ids, attention_mask = heldout_windows(source, tokenizer, seq_len, count)
    effects = effects_in_batches(model, input_ids, attention_mask)
    rows = read_metrics(run_dir)
    summary = write_report(run_dir / "report", tokenizer, effects, f"Where thinking helps: {run_dir}", rows)
    hardest = summary["deciles"][-1]
    lines = [
        f"held-out {source}, {summary['tokens']} tokens: NLL {summary['think_nll']:.4f} with thoughts, "
        f"{summary['base_nll']:.4f} without ({summary['think_nll'] - summary['base_nll']:+.4f})",
        f"hardest decile (NLL without >= {hardest['base_nll_min']:.2f}): {hardest['think_nll']:.4f} with thoughts, "
        f"{hardest['base_nll']:.4f} without ({hardest['delta_nll']:+.4f}); thoughts helped "
        f"{100 * hardest['frac_helped']:.0f}% of its tokens",
    ]
    for key, name in (("reward/mean", "reward"), ("mixing/weight_mean", "mixing weight")):
        values = [row[key] for row in rows if key in row]
        if values:
            first, last = trend(values)
            lines.append(f"{name}: {first:.4g} over the first quarter of the run -> {last:.4g} over the last")
    lines.append(f"report: {run_dir / 'report' / 'index.html'}")
    return lines


def windows(tokenizer, text: str, seq_len: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text's first count * seq_len tokens as (count, seq_len) windows; the last one right-padded."""
    ids = tokenizer.encode(text, add_special_tokens=False)[: count * seq_len]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens")
    rows = [ids[start : start + seq_len] for start in range(0, len(ids), seq_len)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    return input_ids, mask


def effects_in_batches(model, input_ids, attention_mask, baseline=None, batch_size: int = 4) -> TokenEffects:
    parts = [
        token_effects(model, input_ids[s : s + batch_size], attention_mask[s : s + batch_size], baseline)
        for s in range(0, len(input_ids), batch_size)
    ]
    return TokenEffects(*(torch.cat(tensors) for tensors in zip(*(dataclasses.astuple(p) for p in parts), strict=True)))


# ---- tables and pictures ------------------------------------------------------------------------------


def deciles_markdown(rows: list[dict[str, float]]) -> str:
    lines = [
        "| decile | tokens | base NLL range | base NLL | thinking NLL | change | helped |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['decile']} | {r['tokens']} | {r['base_nll_min']:.2f}-{r['base_nll_max']:.2f} | {r['base_nll']:.3f} "
            f"| {r['think_nll']:.3f} | {r['delta_nll']:+.4f} | {100 * r['frac_helped']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def deciles_plot(rows: list[dict[str, float]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(7, 3.6))
    deltas = [r["delta_nll"] for r in rows]
    ax.bar([r["decile"] for r in rows], deltas, color=["#2e7d32" if d < 0 else "#c62828" for d in deltas])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("decile of base NLL (1 = easiest tokens, 10 = hardest)")
    ax.set_ylabel("NLL with thought - without")
    ax.set_xticks([r["decile"] for r in rows])
    ax.set_title(title)
    data = figure_png(figure)
    plt.close(figure)
    return data


CURVES = [
    ("reward/mean", "reward (mean log p of K true tokens)"),
    ("reward/var_within_position", "reward variance across thoughts"),
    ("mixing/weight_mean", "mixing weight w"),
    ("loss/nll_base", "NLL"),
]


def curves_plot(rows: list[dict]) -> bytes:
    """Training curves from metrics.jsonl rows (one per optimizer step); eval metrics when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and "/answer_prob" in k})
    panels = [*CURVES, *([("eval", "eval answer probability")] if eval_keys else [])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        keys = eval_keys if key == "eval" else ["loss/nll_base", "loss/nll_talk"] if key == "loss/nll_base" else [key]
        for k in keys:
            points = [(r["step"], r[k]) for r in rows if k in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=k.split("/", 1)[1])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
    figure.tight_layout()
    data = figure_png(figure)
    plt.close(figure)
    return data


def _colour(delta: float, scale: float) -> str:
    """Green when the thought lowered the NLL (delta < 0), red when it raised it; alpha by size."""
    alpha = min(abs(delta) / scale, 1.0) * 0.85 if scale > 0 else 0.0
    rgb = "46,160,67" if delta < 0 else "220,50,47"
    return f"rgba({rgb},{alpha:.3f})"


def _token_html(text: str) -> str:
    return html.escape(text).replace("\n", "↵<br>")


def text_html(tokenizer, effects: TokenEffects) -> str:
    """Every token of every window as a span coloured by its NLL change, with its thought in a hover box."""
    predicted = effects.predicted
    deltas = (effects.think_nll - effects.base_nll)[predicted]
    scale = float(deltas.abs().quantile(0.95)) if deltas.numel() else 0.0
    blocks = []
    for b in range(effects.input_ids.shape[0]):
        spans = []
        ids = effects.input_ids[b].tolist()
        real = int(predicted[b].sum()) + 1  # tokens in this window
        for n in range(real):
            token = _token_html(tokenizer.decode([ids[n]]))
            if n == 0:  # no thought predicts the first token of a window
                spans.append(f'<span class="t">{token}</span>')
                continue
            i = n - 1  # the thought at position i predicts x_{i+1} = x_n
            delta = float(effects.think_nll[b, i] - effects.base_nll[b, i])
            thought = html.escape(tokenizer.decode(effects.thoughts[b, i].tolist())).replace("\n", "↵")
            tip = (
                f'<span class="tip"><b>thought:</b> <span class="th">{thought}</span><br>'
                f"NLL {float(effects.base_nll[b, i]):.2f} &rarr; {float(effects.think_nll[b, i]):.2f} "
                f"({delta:+.3f}), w = {float(effects.weight[b, i]):.3f}</span>"
            )
            spans.append(f'<span class="t" style="background:{_colour(delta, scale)}">{token}{tip}</span>')
        blocks.append(f'<div class="window">{"".join(spans)}</div>')
    return "\n".join(blocks)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }}
.window {{ font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; border: 1px solid #ddd;
  padding: .8em; margin: 1em 0; border-radius: 6px; }}
.t {{ position: relative; border-radius: 3px; }}
.t .tip {{ display: none; position: absolute; left: 0; top: 1.7em; z-index: 10; background: #fffbe6;
  border: 1px solid #c9b458; padding: .4em .6em; min-width: 16em; font-size: .85em; white-space: pre-wrap;
  box-shadow: 0 2px 6px rgba(0,0,0,.2); }}
.t:hover .tip {{ display: block; }}
.th {{ color: #6a3d9a; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .2em .6em; text-align: right; }}
.legend span {{ padding: 0 .5em; border-radius: 3px; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<p class="legend">Each token is coloured by how the thought before it changed its NLL:
<span style="background:rgba(46,160,67,.7)">helped</span> <span style="background:rgba(220,50,47,.7)">hurt</span>
(strongest colour: the 95th percentile of |change|, {scale:.3f} nats). Hover a token to see its thought.</p>
{text}
<h2>Change in NLL by token difficulty</h2>
{table}
<img alt="NLL change by decile of base NLL" src="data:image/png;base64,{deciles_png}">
{curves}
</body></html>
"""


def _table_html(rows: list[dict[str, float]]) -> str:
    head = "<tr><th>decile</th><th>tokens</th><th>base NLL</th><th>thinking NLL</th><th>change</th><th>helped</th></tr>"
    body = "".join(
        f"<tr><td>{r['decile']}</td><td>{r['tokens']}</td><td>{r['base_nll']:.3f}</td><td>{r['think_nll']:.3f}</td>"
        f"<td>{r['delta_nll']:+.4f}</td><td>{100 * r['frac_helped']:.0f}%</td></tr>"
        for r in rows
    )
    return f"<table>{head}{body}</table>"


def write_report(
    out: Path,
    tokenizer,
    effects: TokenEffects,
    title: str,
    metrics_rows: list[dict] | None = None,
    page_windows: int = 2,
) -> dict:
    """Write index.html, difficult_tokens.{md,json,png} and (with metrics rows) curves.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    predicted = effects.predicted
    rows = difficulty_deciles(effects.base_nll[predicted], effects.think_nll[predicted])
    deltas = (effects.think_nll - effects.base_nll)[predicted]
    summary = {
        "tokens": int(predicted.sum()),
        "base_nll": float(effects.base_nll[predicted].mean()),
        "think_nll": float(effects.think_nll[predicted].mean()),
        "mixing_weight": float(effects.weight[predicted].mean()),
        "deciles": rows,
    }
    (out / "difficult_tokens.json").write_text(json.dumps(summary, indent=2))
    (out / "difficult_tokens.md").write_text(deciles_markdown(rows))
    deciles_png = deciles_plot(rows, title)
    (out / "difficult_tokens.png").write_bytes(deciles_png)
    curves = ""
    if metrics_rows:
        curves_png = curves_plot(metrics_rows)
        (out / "curves.png").write_bytes(curves_png)
        curves = (
            '<h2>Training curves</h2><img alt="training curves" '
            f'src="data:image/png;base64,{base64.b64encode(curves_png).decode()}">'
        )
    shown = TokenEffects(*(t[:page_windows] for t in dataclasses.astuple(effects)))
    page = PAGE.format(
        title=html.escape(title),
        summary=(
            f"{summary['tokens']} held-out tokens: mean NLL {summary['base_nll']:.4f} without thinking, "
            f"{summary['think_nll']:.4f} with a thought before each token; mean mixing weight "
            f"{summary['mixing_weight']:.4f}."
        ),
        scale=float(deltas.abs().quantile(0.95)) if deltas.numel() else 0.0,
        text=text_html(tokenizer, shown),
        table=_table_html(rows),
        deciles_png=base64.b64encode(deciles_png).decode(),
        curves=curves,
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return summary


def read_metrics(source: Path) -> list[dict]:
    """metrics.jsonl rows of a run directory, or of the run a checkpoint folder belongs to ([] if none)."""
    run_dir = source.parent.parent if source.parent.name == "checkpoints" else source
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qstar-rl report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", default="smollm2-135m", help="run directory, checkpoint, exported folder")
    parser.add_argument("--baseline", default=None, help="model whose NLL is 'without thinking' (default: own base)")
    parser.add_argument("--text", type=Path, default=None, help="held-out text file (default: gsm_symbolic solutions)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per window")
    parser.add_argument("--windows", type=int, default=16, help="windows of held-out text to analyse")
    parser.add_argument("--page-windows", type=int, default=2, help="windows shown token by token on the page")
    parser.add_argument("--thought-length", type=int, default=8, help="M for a model name (untrained thinking)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <checkpoint>/report)")
    args = parser.parse_args(argv)

    from qstar_rl.generate import load_for_generation

    with contextlib.redirect_stdout(sys.stderr):
        model, tokenizer = load_for_generation(args.checkpoint, args.thought_length)
        baseline = load_for_generation(args.baseline, args.thought_length)[0] if args.baseline else None
    text = args.text.read_text(encoding="utf-8", errors="replace") if args.text else held_out_text()
    input_ids, attention_mask = windows(tokenizer, text, args.seq_len, args.windows)
    effects = effects_in_batches(model, input_ids, attention_mask, baseline)
    source = Path(args.checkpoint)
    out = args.out or (source / "report" if source.is_dir() else Path("report") / args.checkpoint.replace("/", "_"))
    title = f"Where thinking helps: {args.checkpoint}" + (f" vs {args.baseline}" if args.baseline else "")
    metrics_rows = read_metrics(source)
    summary = write_report(out, tokenizer, effects, title, metrics_rows, args.page_windows)
    print(deciles_markdown(summary["deciles"]))
    print(f"{summary['tokens']} tokens: NLL {summary['base_nll']:.4f} -> {summary['think_nll']:.4f} with thinking")
    print(f"wrote {out}/index.html, difficult_tokens.{{md,json,png}}" + (", curves.png" if metrics_rows else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
