"""Every problem of a run's config before anything heavy starts, composed from the modules that own what they
check: values (config), data sources (data), model names (model), the DeepSpeed JSON (engine), evaluation
tasks (eval). The entry points (`qstar-rl train`, `ray-train`, `experiment`) list them all at once, exit 2."""

from qstar_rl import data, engine, eval, loading
from qstar_rl.config import Config, ExperimentConfig, load_config_and_problems, validate, validate_experiment


def owned_problems(config: Config, world_size: int) -> list[str]:
    """The problems that modules other than config own: data source, model name, DeepSpeed JSON, tasks."""
    return [
        *data.source_problems(config.data.source),
        *loading.name_problems(config.model.name),
        *engine.deepspeed_json_problems(config, world_size),
        *eval.task_problems(config.eval.tasks),
    ]


def run_problems(config: Config, world_size: int = 1) -> list[str]:
    """Every problem of `config` for a run on `world_size` data-parallel ranks (empty: fine)."""
    return validate(config, world_size) + owned_problems(config, world_size)


def experiment_problems(e: ExperimentConfig) -> list[str]:
    """Every problem of an experiment config, with its training config's (listed under `overrides:`)."""
    problems = validate_experiment(e)
    if any(p.startswith("train_config:") for p in problems):
        return problems
    train, _ = load_config_and_problems(e.train_config, e.overrides)
    return problems + [f"overrides: {p}" for p in owned_problems(train, 1)]
