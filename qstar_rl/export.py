"""`qstar-rl export`: a training checkpoint -> a plain HF folder + meta tokens + mixing head.

    qstar-rl export --checkpoint runs/default/checkpoints/step_000020 --out exported/
    qstar-rl export --checkpoint runs/default --out exported/          # the run's latest checkpoint

Works on one CPU process, without the process group that wrote the checkpoint: ZeRO-3 partitions are
merged into fp32 weights with DeepSpeed's zero_to_fp32.
"""

import argparse
import sys
from pathlib import Path

import torch

from qstar_rl.checkpoint import latest_checkpoint
from qstar_rl.config import load_config
from qstar_rl.engine import choose_deepspeed_accelerator
from qstar_rl.loading import build_thinking_lm
from qstar_rl.model import ThinkingLM


def checkpoint_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Full fp32 state dict of ThinkingLM from a checkpoint folder (DeepSpeed ZeRO or plain)."""
    if (folder / "plain.pt").is_file():
        return torch.load(folder / "plain.pt", weights_only=True)["model"]
    choose_deepspeed_accelerator()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def load_checkpoint(checkpoint: Path) -> tuple[ThinkingLM, object]:
    """ThinkingLM and tokenizer from a checkpoint folder, or from a run directory's latest checkpoint."""
    folder = checkpoint if (checkpoint / "config.yaml").is_file() and checkpoint.name.startswith("step_") else None
    if folder is None:
        folder = latest_checkpoint(checkpoint)
    if folder is None:
        raise FileNotFoundError(f"{checkpoint}: neither a checkpoint folder nor a run directory with one")
    config = load_config(folder / "config.yaml")
    model, tokenizer = build_thinking_lm(config.model.name, config.thought, config.train.seed)
    model.load_state_dict(checkpoint_state_dict(folder))
    return model, tokenizer


def export(checkpoint: Path, out: Path) -> Path:
    model, tokenizer = load_checkpoint(checkpoint)
    model.save_pretrained(out, tokenizer)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qstar-rl export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder or run directory")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except FileNotFoundError as err:
        print(err, file=sys.stderr)
        return 2
    print(f"exported {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
