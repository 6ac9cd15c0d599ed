"""Config loading, dotted overrides and validation: every problem listed at once, naming its key."""

import itertools
import json
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from qstar_rl.checks import run_problems
from qstar_rl.config import (
    Config,
    ConfigError,
    config_to_dict,
    load_config,
    load_config_and_problems,
)
from qstar_rl.data import local_data_files
from qstar_rl.engine import deepspeed_batch_settings


def test_defaults_are_valid_and_overrides_are_typed():
    config = load_config(None, ["thought.length=4", "optim.lr=1e-6", "train.steps=3", "wandb.name=null"])
    assert (config.thought.length, config.optim.lr, config.train.steps) == (4, 1e-6, 3)
    assert isinstance(config.optim.lr, float) and config.wandb.name is None
    assert run_problems(config) == []


def test_yaml_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("thought:\n  num_thoughts: 3\n  length: 5\ntrain:\n  steps: 7\n")
    config = load_config(path, ["train.steps=9"])
    assert (config.thought.num_thoughts, config.thought.length, config.train.steps) == (3, 5, 9)


def test_all_type_and_key_problems_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["thought.lenght=4", "optim.lr=abc", "nope.x=1", "train.steps=2.5", "model=3"])
    keys = [problem.split(":")[0] for problem in err.value.problems]
    assert keys == ["thought.lenght", "optim.lr", "nope", "train.steps", "model"]


def test_all_semantic_problems_at_once(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    config = load_config(
        None,
        [
            "thought.num_thoughts=1",
            "thought.attention=sparse",
            "data.seq_len=3",
            "thought.talk_length=4",
            "optim.schedule=step",
            "train.micro_batch_size=3",
            "train.global_batch_size=9",
            f"deepspeed.config={ds}",
            "data.source=missing/*.jsonl",
            "wandb.mode=loud",
        ],
    )
    problems = run_problems(config, world_size=2)
    text = "\n".join(problems)
    for key in [
        "thought.num_thoughts",
        "thought.attention",
        "data.seq_len",
        "optim.schedule",
        "train.global_batch_size",
        "data.source",
        "wandb.mode",
    ]:
        assert key in text, key
    assert len(problems) == 7, problems
    # with world size 1, 9 is a multiple of 3 and the DeepSpeed JSON's 4 now disagrees with B=3
    problems = run_problems(config, world_size=1)
    assert any("train_micro_batch_size_per_gpu=4" in p for p in problems)


@pytest.mark.parametrize(
    "key,choices,bad",
    [
        ("model.dtype", ("auto", "float32", "bfloat16"), "fp16"),
        ("model.cpu_allocator", ("auto", "reuse", "glibc", "jemalloc"), "tcmalloc"),
    ],
)
def test_a_choice_key_is_auto_by_default_and_a_bad_value_is_a_listed_problem(key, choices, bad):
    section, field = key.split(".")
    assert getattr(getattr(load_config(None), section), field) == "auto"
    for choice in choices:
        assert run_problems(load_config(None, [f"{key}={choice}"])) == []
    problems = run_problems(load_config(None, [f"{key}={bad}", "train.steps=0"]))
    assert f"{key}: must be one of {', '.join(choices)}, got {bad!r}" in problems
    assert any(p.startswith("train.steps") for p in problems)  # listed with the others, not alone


def test_deepspeed_json_must_exist_and_leave_the_optimizer_to_us(tmp_path):
    assert "no such file" in run_problems(load_config(None, ["deepspeed.config=/nope.json"]))[0]
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}))
    assert any("optimizer" in p for p in run_problems(load_config(None, [f"deepspeed.config={ds}"])))


def test_batch_settings_come_from_the_config():
    config = load_config(None, ["train.micro_batch_size=2", "train.global_batch_size=8", "optim.grad_clip=0.5"])
    assert deepspeed_batch_settings(config, world_size=2) == {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 8,
        "gradient_clipping": 0.5,
    }


def test_every_field_has_a_docstring():
    import ast
    import inspect

    import qstar_rl.config as module

    tree = ast.parse(inspect.getsource(module))
    documented = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            body = node.body
            for a, b in itertools.pairwise(body):
                if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
                    documented.add(f"{node.name}.{a.target.id}")

    def walk(cls):
        for f in fields(cls):
            assert f"{cls.__name__}.{f.name}" in documented, f"{cls.__name__}.{f.name} has no docstring"
            if is_dataclass(f.type):
                walk(f.type)

    walk(Config)


def test_the_readme_config_reference_lists_every_key():
    readme = (Path(__file__).parents[1] / "README.md").read_text()

    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]

    missing = [key for key in leaves(config_to_dict(Config())) if f"| `{key}` |" not in readme]
    assert not missing, f"README's config reference lacks {missing}"


@pytest.mark.parametrize(
    "name,world_size", [("default", 1), ("tiny", 1), ("mistral7b_openwebmath", 8), ("mistral7b_openwebmath", 1)]
)
def test_shipped_configs_are_valid(name, world_size):
    from pathlib import Path

    path = Path(__file__).parents[1] / "qstar_rl" / "configs" / f"{name}.yaml"
    assert run_problems(load_config(path), world_size) == []


def problems_of(path=None, overrides=(), world_size: int = 1) -> list[str]:
    """Every problem `qstar-rl train` reports for a config file plus overrides (parse, types, semantics)."""
    config, problems = load_config_and_problems(path, list(overrides))
    return problems + run_problems(config, world_size)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("train:\n  steps: [1, 2\n", "not valid YAML: "),
        ("train:\n\tsteps: 3\n", "(YAML indents with spaces, not tabs)"),
        ("- a list\n- not sections\n", "the top level must be a mapping of sections, got list"),
    ],
)
def test_a_broken_yaml_file_is_one_clear_problem(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    problems = problems_of(path, ["train.steps=x"])
    assert any(str(path) in p and expected in p for p in problems), problems
    assert any(p.startswith("train.steps: expected int") for p in problems)  # the overrides still checked


def test_a_yaml_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("wandb:\n  name: caf\xe9\n".encode("latin-1"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: not UTF-8 text") and "save the file as UTF-8" in problem


def test_every_broken_override_is_listed_at_once():
    problems = problems_of(None, ["train.steps", "optim.lr=[1,", "optim.lr.x=1", "=3", "thought.length=two"])
    text = "\n".join(problems)
    assert "override 'train.steps' is not of the form dotted.key=value" in text
    assert "optim.lr: the value '[1,' is not valid YAML" in text
    assert "override '=3' is not of the form" in text
    assert "thought.length: expected int, got 'two'" in text
    assert len(problems) == 5, problems  # optim.lr.x: lr is a value, not a section (after lr=[1, failed: its own)


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "inf"])
@pytest.mark.parametrize(
    "key", ["optim.lr", "optim.grad_clip", "thought.sample_temperature", "loss.policy_weight", "train.step_timeout_s"]
)
def test_non_finite_numbers_are_config_errors(key, value):
    assert f"{key}: must be a finite number, got" in "\n".join(problems_of(None, [f"{key}={value}"]))


def test_learning_rates_and_decays_that_would_overflow_the_weights_are_config_errors():
    """Above 1 an AdamW step can overflow finite weights (the learner then relies on skipping non-finite
    gradients alone): optim.lr=1e30 and weight_decay=1e30 are refused, both named at once."""
    text = "\n".join(problems_of(None, ["optim.lr=1e30", "optim.weight_decay=1e30"]))
    assert "optim.lr: must lie in (0, 1] (AdamW moves every weight by ~lr a step), got 1e+30" in text
    assert "optim.weight_decay: must lie in [0, 1], got 1e+30" in text
    assert problems_of(None, ["optim.lr=1", "optim.weight_decay=1"]) == []


def test_names_and_paths_that_cannot_work_are_config_errors(tmp_path):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "data.bin").write_bytes(b"\0\1")
    ds = tmp_path / "list.json"
    ds.write_text("[1, 2]")
    stage2 = tmp_path / "stage2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    text = "\n".join(problems_of(None, ["model.name=tiny-foo", f"train.run_dir={tmp_path / 'a_file'}"]))
    assert "model.name: 'tiny-foo': tiny models exist for tiny-llama, tiny-mistral, tiny-qwen2, tiny-gpt2" in text
    assert f"train.run_dir: {tmp_path / 'a_file'} is a file, not a folder" in text
    text = "\n".join(problems_of(None, [f"model.name={tmp_path / 'missing'}", f"data.source={tmp_path / 'data.bin'}"]))
    assert f"model.name: {tmp_path / 'missing'} is not a model folder (no config.json there)" in text
    assert "unsupported suffix .bin (supported: .jsonl, .json, .txt, .parquet)" in text
    text = "\n".join(problems_of(None, [f"deepspeed.config={ds}"]))
    assert "must hold a JSON object at the top level, got list" in text
    assert "asks for ZeRO stage 2; qstar-rl runs ZeRO stage 3" in "\n".join(
        problems_of(None, [f"deepspeed.config={stage2}"])
    )


@pytest.mark.parametrize(
    "override", ["thought.length=100000000", "thought.num_thoughts=100000000", "train.micro_batch_size=100000000"]
)
def test_absurd_sizes_are_config_errors_that_show_the_estimate(override):
    problems = problems_of(None, [override, "train.global_batch_size=100000000"])
    (size,) = [p for p in problems if "GiB of activations" in p]
    assert size.startswith("train.micro_batch_size x data.seq_len x thought.num_thoughts")
    assert "this machine has" in size


def test_a_window_of_a_billion_tokens_is_a_config_error():
    assert any("GiB of activations" in p for p in problems_of(None, ["data.seq_len=1000000000"]))
    assert not any("GiB of activations" in p for p in problems_of(None, ["data.seq_len=4096"]))


def test_absolute_and_relative_globs_both_name_files(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path)
    assert local_data_files(str(tmp_path / "sub" / "*.jsonl")) == [tmp_path / "sub" / "a.jsonl"]
    assert local_data_files("sub/*.jsonl") == [Path("sub/a.jsonl")]
    assert local_data_files(str(tmp_path / "**" / "*.jsonl")) == [tmp_path / "sub" / "a.jsonl"]
    assert not any(p.startswith("data.source") for p in problems_of(None, [f"data.source={tmp_path}/sub/*.jsonl"]))
