"""The trainer end to end through its real entry points: subprocesses, real DeepSpeed ZeRO-3 (1 and 2 ranks
on CPU with gloo, the second through the `deepspeed` launcher), checkpoints, kills, wandb offline files."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import cpuinfo_has_bf16
from wandb_file import history

from qstar_rl.config import ThoughtConfig
from qstar_rl.engine import free_port, resolve_dtype
from qstar_rl.export import checkpoint_state_dict
from qstar_rl.loading import load_lm
from qstar_rl.model import ThinkingLM

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
TINY = ROOT / "qstar_rl" / "configs" / "tiny.yaml"
METRIC_KEYS = [
    "reward/mean",
    "reward/std",
    "reward/var_within_position",
    "advantage/mean",
    "advantage/frac_positive",
    "loss/total",
    "loss/policy",
    "loss/nll_base",
    "loss/nll_talk",
    "mixing/weight_mean",
    "thought/logprob_gap",
    "optim/grad_norm",
    "optim/lr",
    "time/rollout",
    "time/learn",
    "time/weight_sync",
    "time/step",
    "perf/tokens_per_s",
    "perf/thought_tokens_per_s",
]
EVAL = ["eval.tasks=gsm_symbolic", "eval.every_steps=2", "eval.limit=3", "eval.max_new_tokens=3"]
"""Periodic evaluation at steps 2 and the last, on 3 offline items (reasoning-gym)."""
EVAL_KEYS = [f"eval/gsm_symbolic/{m}{s}" for s in ("", "_no_think") for m in ("answer_prob", "exact_match")]
DETERMINISTIC = [k for k in METRIC_KEYS if not k.startswith(("time/", "perf/"))]


def env(**extra: str) -> dict[str, str]:
    dropped = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "WANDB_MODE", "WANDB_API_KEY")
    base = {k: v for k, v in os.environ.items() if k not in dropped}
    return {**base, "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu", **extra}


def train(run_dir: Path, *overrides: str, ranks: int = 1, check: bool = True, **extra_env: str):
    """`qstar-rl train` of the tiny config on 1 rank or through the deepspeed launcher. wandb (its service costs
    ~2.5 s a start) and the end-of-run report (~15 s: it reloads the checkpoint and scores held-out text) are
    off unless the overrides turn them on, as the tests of those do."""
    args = ["--config", str(TINY), "wandb.mode=disabled", "train.report_windows=0", f"train.run_dir={run_dir}"]
    args += overrides
    if ranks == 1:
        cmd = [sys.executable, "-m", "qstar_rl.train", *args]
    else:
        launcher = Path(sys.executable).parent / "deepspeed"
        cmd = [
            str(launcher),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            "--module",
            "qstar_rl.train",
            *args,
        ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    overrides = ["train.steps=3", "train.checkpoint_every=3", "train.thought_table_every=1"]
    train(
        run_dir, *overrides, "model.gradient_checkpointing=true", "wandb.mode=offline", "train.report_windows=2", *EVAL
    )
    return run_dir


def test_tiny_run_logs_every_metric_to_jsonl_and_wandb(tiny_run):
    rows = metrics(tiny_run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        missing = [k for k in METRIC_KEYS if k not in row]
        assert not missing, missing
        assert math.isfinite(row["loss/total"]) and row["optim/grad_norm"] > 0
        assert abs(row["thought/logprob_gap"]) < 1e-4  # rollout and learner agree on the same weights
    assert "ZeRO-3: rank 0 holds" in (tiny_run / "train.log").read_text()
    assert "activation checkpointing on" in (tiny_run / "train.log").read_text()
    # 'auto' with checkpointing: `python -m qstar_rl.train` started over with jemalloc preloaded
    assert "CPU allocator: jemalloc, freed memory kept for reuse" in (tiny_run / "train.log").read_text()
    run_files = list((tiny_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, "wandb ran offline inside the run directory"
    logged = [r for r in history(run_files[0]) if "reward/mean" in r]
    assert [r["_step"] for r in logged] == [1, 2, 3]
    for r in logged:
        assert math.isfinite(r["reward/mean"]) and math.isfinite(r["reward/var_within_position"])
    assert list(tiny_run.glob("wandb/offline-run-*/files/media/table/thoughts_*.table.json"))
    thoughts = [json.loads(line) for line in (tiny_run / "thoughts.jsonl").read_text().splitlines()]
    assert thoughts and all(t["thought"] and t["context"] for t in thoughts)
    assert [r["step"] for r in rows if EVAL_KEYS[0] in r] == [2, 3]  # every 2 steps and after the last
    for row in (rows[1], rows[2]):
        assert all(0 <= row[k] <= 1 for k in EVAL_KEYS) and row["time/eval"] > 0
        assert row["eval/gsm_symbolic/answer_prob"] > row["eval/gsm_symbolic/answer_prob_full"] > 0
    assert [r["_step"] for r in logged if EVAL_KEYS[0] in r] == [2, 3], "eval metrics reach wandb"


def test_a_finished_run_reports_thinking_on_held_out_text(tiny_run):
    """The end of `qstar-rl train` on the Shakespeare corpus: NLL with and without thoughts on held-out scenes
    (all tokens, hardest decile), the reward and mixing-weight trends, and the HTML report it wrote."""
    log = (tiny_run / "train.log").read_text()
    line = r"held-out shakespeare-heldout, (\d+) tokens: NLL ([\d.]+) with thoughts, ([\d.]+) without"
    heldout = re.search(line, log)
    assert heldout and int(heldout[1]) > 0
    report = json.loads((tiny_run / "report" / "difficult_tokens.json").read_text())
    assert float(heldout[2]) == pytest.approx(report["think_nll"], abs=1e-4)
    assert float(heldout[3]) == pytest.approx(report["base_nll"], abs=1e-4)
    assert "hardest decile (NLL without >= " in log
    assert "reward: " in log and "mixing weight: " in log and " over the last" in log
    assert f"report: {tiny_run / 'report' / 'index.html'}" in log
    assert (tiny_run / "report" / "index.html").is_file()


def test_two_zero3_ranks_with_activation_checkpointing_match_one_rank_without(one_rank_reference, tmp_path):
    overrides = ["train.steps=4", "train.micro_batch_size=1", "train.global_batch_size=2", *EVAL]
    one = one_rank_reference  # 1 rank, 2 accumulation micro-batches: the same overrides
    two = tmp_path / "two"
    proc = train(two, *overrides, "model.gradient_checkpointing=true", ranks=2)  # 2 ranks, 1 micro-batch each
    assert "activation checkpointing on" in (two / "train.log").read_text()
    assert "CPU allocator: jemalloc" in (two / "train.log").read_text(), "launched ranks restart with jemalloc too"
    assert "ZeRO-3: rank 0 holds" in (two / "train.log").read_text()
    held = next(line for line in (two / "train.log").read_text().splitlines() if "holds" in line)
    assert "(50.0%)" in held or "(49." in held or "(50." in held, held  # parameters really partitioned
    assert proc.returncode == 0
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 4
    assert_same_losses(a, b)
    for key in EVAL_KEYS:  # evaluated with the gathered ZeRO-3 weights: the same numbers as one rank
        assert a[1][key] == pytest.approx(b[1][key], abs=1e-5, rel=1e-4), key

    # A checkpoint resumes on another world size (DeepSpeed's universal format, the same global batch): 1 -> 2
    # and 2 -> 1 ranks continue as the uninterrupted runs did.
    for source, ranks, written_by in ((one, 2, 1), (two, 1, 2)):
        resumed = tmp_path / f"{written_by}_then_{ranks}"
        shutil.copytree(source, resumed)
        shutil.rmtree(resumed / "checkpoints" / "step_000004")  # as if stopped after step 2
        train(resumed, *overrides[:3], ranks=ranks)  # without the periodic eval (listed as a change)
        log = (resumed / "train.log").read_text()
        assert f"step_000002 was written by {written_by} rank(s); resuming on {ranks}" in log
        assert not list((resumed / "checkpoints").glob("universal-*")), "the converted copy is removed"
        rows = metrics(resumed)
        assert [r["step"] for r in rows] == [1, 2, 3, 4]
        assert_same_losses(a, rows)


def assert_same_losses(a: list[dict], b: list[dict]) -> None:
    for row_a, row_b in zip(a, b, strict=True):
        for key in ("loss/total", "loss/policy", "loss/nll_base", "loss/nll_talk", "reward/mean", "optim/grad_norm"):
            assert row_a[key] == pytest.approx(row_b[key], abs=1e-4, rel=1e-4), (row_a["step"], key)


def test_a_restart_passes_over_partial_and_damaged_checkpoints_and_never_trains_over_them(tmp_path):
    run_dir = tmp_path / "run"
    killed = train(run_dir, "train.checkpoint_every=2", check=False, QSTAR_RL_KILL_AT="checkpoint_midway_4")
    assert killed.returncode == -signal.SIGKILL
    straight = metrics(run_dir)  # steps 1-4 were logged before the kill: the rows of an uninterrupted run
    assert [r["step"] for r in straight] == [1, 2, 3, 4]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step_000004").is_dir() and not (checkpoints / "step_000004" / "manifest.json").exists()
    state = checkpoint_state_dict(checkpoints / "step_000002")  # loadable without any process group
    assert "start_embedding" in state and torch.isfinite(state["start_embedding"]).all()
    (checkpoints / "latest").write_text("garbage")
    proc = train(run_dir, "train.checkpoint_every=2")  # ignores the half-written step 4, resumes from step 2
    assert "checkpoints/latest is unusable: holds 'garbage'" in proc.stderr
    assert f"resumed from {checkpoints / 'step_000002'} (step 2)" in (run_dir / "train.log").read_text()
    assert (checkpoints / "latest").read_text() == "step_000004"
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for row_a, row_b in zip(straight, resumed, strict=True):  # steps 3-4 again, exactly as the first time
        assert {k: row_a[k] for k in DETERMINISTIC} == {k: row_b[k] for k in DETERMINISTIC}, row_a["step"]

    # Every checkpoint damaged: the restart names each and stops (exit 2) before training; nothing is lost.
    optim = next((checkpoints / "step_000004").glob("*optim_states.pt"))
    flip_byte(optim)
    os.truncate(checkpoints / "step_000002" / "run_state_rank0.pt", 100)
    proc = train(run_dir, "train.checkpoint_every=2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "has checkpoints but none is intact" in proc.stderr
    assert f"step_000004 is damaged: {optim.name} does not match its checksum" in proc.stderr
    assert "step_000002 is damaged: run_state_rank0.pt has 100 bytes, the manifest says" in proc.stderr
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]

    # Starting over is the user's call, and the old history is moved aside, not deleted.
    train(run_dir, "train.steps=1", "--resume", "never")
    (previous,) = run_dir.glob("previous-*")
    assert [r["step"] for r in metrics(previous)] == [1, 2, 3, 4]
    assert {p.name for p in (previous / "checkpoints").glob("step_*")} == {"step_000002", "step_000004"}
    assert [r["step"] for r in metrics(run_dir)] == [1]
    assert [p.name for p in (run_dir / "attempts").glob("*.yaml")] == ["001.yaml"]
    assert len(list((previous / "attempts").glob("*.yaml"))) == 2  # the killed start and its resume


def flip_byte(path: Path, offset: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1
    path.write_bytes(bytes(data))


def test_bad_config_lists_every_problem_and_exits_2(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n\tsteps: 3\n")  # a tab
    overrides = ["thought.num_thoughts=1", "train.global_batch_size=3", "bogus.key=1", "optim.lr=fast"]
    overrides += ["deepspeed.config=missing.json", "optim.grad_clip=.nan", "train.steps"]
    command = [sys.executable, "-m", "qstar_rl.cli", "train", "--config", str(broken), f"train.run_dir={tmp_path}"]
    proc = subprocess.run(
        [*command, *overrides],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for key in ("thought.num_thoughts", "train.global_batch_size", "bogus", "optim.lr", "deepspeed.config"):
        assert key in proc.stderr, key
    assert "(YAML indents with spaces, not tabs)" in proc.stderr
    assert "optim.grad_clip: must be a finite number" in proc.stderr
    assert "override 'train.steps' is not of the form dotted.key=value" in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_source_without_windows_exits_2_before_the_model_loads(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for source, expected, extra_env in (
        (str(empty), "yields 0 windows of 24 tokens per epoch", {}),
        ("someone/no-such-dataset", "could not read it from the hub", offline),
    ):
        run_dir = tmp_path / "run"
        proc = train(run_dir, f"data.source={source}", check=False, **extra_env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert expected in proc.stderr
        assert "ZeRO-3: rank 0 holds" not in proc.stderr, "stopped before the model was built"
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()


def test_a_corpus_with_bad_documents_trains_and_counts_them_in_the_dtype_auto_resolves_to(tmp_path):
    """Bad documents are skipped and counted (data/*); the same run (one start for two behaviours) has
    model.dtype=auto, and config.yaml (of the run and of its checkpoint) and the log line name the dtype this
    machine resolved it to."""
    good = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. "
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": good}).encode() for _ in range(2)]  # ~1 window an epoch: every record is read
    lines += [
        json.dumps({"text": ""}).encode(),
        b'{"text": "\xff\xfe\xfd binary"}',
        json.dumps({"text": "Hi"}).encode(),
        json.dumps({"title": "no text field"}).encode(),
    ]
    corpus.write_bytes(b"\n".join(lines))
    run_dir = tmp_path / "run"
    train(run_dir, f"data.source={corpus}", "train.steps=2", "model.dtype=auto")
    last = metrics(run_dir)[-1]
    assert math.isfinite(last["loss/total"])
    assert last["data/skipped_empty"] >= 1 and last["data/skipped_undecodable"] >= 1
    assert last["data/skipped_too_short"] >= 1 and last["data/skipped_missing_field"] >= 1

    if torch.cuda.is_available():
        expected = resolve_dtype("auto")
    else:
        expected = "bfloat16" if cpuinfo_has_bf16() else "float32"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["dtype"] == expected
    checkpointed = next(run_dir.glob("checkpoints/step_*/config.yaml"))
    assert yaml.safe_load(checkpointed.read_text())["model"]["dtype"] == expected
    assert f"training tiny-llama ({expected}, activation checkpointing off)" in (run_dir / "train.log").read_text()


def test_export_then_reload_gives_the_same_scores(tiny_run, tmp_path):
    out = tmp_path / "exported"
    proc = subprocess.run(
        [sys.executable, "-m", "qstar_rl.cli", "export", "--checkpoint", str(tiny_run), "--out", str(out)],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = ThinkingLM.from_pretrained(out)
    lm, tokenizer = load_lm("tiny-llama")
    from_checkpoint = ThinkingLM(lm, ThoughtConfig(2, 3, 2), tokenizer=tokenizer)
    from_checkpoint.load_state_dict(checkpoint_state_dict(tiny_run / "checkpoints" / "step_000003"))
    fresh = ThinkingLM(load_lm("tiny-llama")[0], ThoughtConfig(2, 3, 2), tokenizer=tokenizer)
    assert not torch.equal(reloaded.start_embedding, fresh.start_embedding), "trained meta tokens survive"
    assert torch.equal(reloaded.start_embedding, from_checkpoint.start_embedding)
    ids = torch.randint(3, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    thoughts, _ = reloaded.sample_thoughts(ids, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = reloaded.score(ids, thoughts), from_checkpoint.score(ids, thoughts)
    for field in ("thought_logprobs", "talk_logprobs", "mixing_weight", "base_logprobs"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=1e-6, rtol=0)
    # `qstar-rl generate` takes the run directory or the exported folder and thinks the same thoughts.
    texts = []
    for source in (tiny_run, out):
        cmd = [sys.executable, "-m", "qstar_rl.cli", "generate", "--checkpoint", str(source), "--prompt", "To be"]
        proc = subprocess.run([*cmd, "--show-thoughts"], cwd=ROOT, env=env(), capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        texts.append(proc.stdout)
    assert texts[0] == texts[1] and texts[0].startswith("To be<|")


def test_the_paper_config_shrunk_to_a_tiny_model_trains_in_bf16_with_checkpointing(tmp_path):
    """qstar_rl/configs/mistral7b_openwebmath.yaml with only the model, the data and the sizes shrunk: its
    keys (bf16, activation checkpointing, R=2, M=9, K=4, lr 1e-6, policy weight 1e6, warm-up 20) run."""
    corpus = tmp_path / "openwebmath.jsonl"  # OpenWebMath's schema: text (+ url, metadata)
    docs = [
        {
            "text": f"Let $x = {a}$. Then $x^2 = {a * a}$ and $2x = {2 * a}$, so $x^2 + 2x = {a * a + 2 * a}$.",
            "url": "u",
        }
        for a in range(3, 40)
    ]
    corpus.write_text("\n".join(json.dumps(d) for d in docs))
    run_dir = tmp_path / "paper"
    paper = ROOT / "qstar_rl" / "configs" / "mistral7b_openwebmath.yaml"
    overrides = ["model.name=tiny-mistral", f"data.source={corpus}", "data.seq_len=24", "train.steps=2"]
    overrides += ["train.global_batch_size=2", "wandb.mode=offline", f"train.run_dir={run_dir}"]
    overrides += ["eval.tasks=", "eval.every_steps=0"]  # GSM8K / CommonsenseQA come from the hub
    overrides += ["train.report_windows=0"]
    cmd = [sys.executable, "-m", "qstar_rl.train", "--config", str(paper), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    log = (run_dir / "train.log").read_text()
    assert "(bfloat16, activation checkpointing on)" in log and "R=2, M=9, K=4" in log
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert all(math.isfinite(row[k]) for k in DETERMINISTIC), row
        assert abs(row["thought/logprob_gap"]) < 0.05  # bf16 rollout vs bf16 learner, same weights
        assert row["optim/skipped_steps"] == 0
