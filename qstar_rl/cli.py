"""The `qstar-rl` command: qstar-rl {train,ray-train,export,generate,eval,report,experiment} ... (each also runs as
`python -m qstar_rl.<name>`)."""

import sys

COMMANDS = {
    "train": ("qstar_rl.train", "train with Quiet-STaR under DeepSpeed ZeRO-3"),
    "ray-train": ("qstar_rl.ray_train", "the same training on a Ray cluster: rollout and learner actors"),
    "export": ("qstar_rl.export", "checkpoint -> plain HF folder + meta tokens + mixing head"),
    "generate": ("qstar_rl.generate", "generate text, thinking a thought before every token"),
    "eval": ("qstar_rl.eval", "zero-shot answer probability and exact match, with and without thinking"),
    "report": ("qstar_rl.report", "where thinking helps: difficult-token table, plots, HTML page"),
    "experiment": ("qstar_rl.experiment", "does thinking help? base, NLL controls and Quiet-STaR over seeds"),
}


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:10} {help_}" for name, (_, help_) in COMMANDS.items())
        print(f"usage: qstar-rl COMMAND [options]\n\ncommands:\n{lines}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    if from_command_line:
        # The command then reads its arguments from the command line, as under `python -m qstar_rl.<name>`, and
        # knows it may restart its process with that command line (`qstar-rl train` does, for its allocator).
        sys.argv = [f"qstar-rl {argv[0]}", *argv[1:]]
        return module.main()
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
