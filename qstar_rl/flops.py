"""Counting the FLOPs of a training step (the experiment's compute matching, bench/step_cost.py)."""

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class PhaseFlops(TorchDispatchMode):
    """Inside `with PhaseFlops() as flops:`, counts the FLOPs of every op torch's flop counter knows (matrix
    products, attention, convolutions) in `total`; flops(phase) stores the count since the previous mark in
    `values[phase]`.

    torch's FlopCounterMode itself cannot be used here: its module tracker hooks every module's inputs for
    backward and fails on inputs without a gradient function (sampling under no_grad, DeepSpeed's hooks).
    """

    def __init__(self) -> None:
        super().__init__()
        self.values: dict[str, float] = {}
        self.total = 0
        self.last = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out

    def __call__(self, phase: str) -> None:
        self.values[phase], self.last = float(self.total - self.last), self.total
