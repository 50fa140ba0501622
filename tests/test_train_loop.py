"""The shared training epoch: no read of a device value in a steady-state step, and a non-finite loss still stops
the run naming its step and files."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from util.errors import UserError
from util.train.loop import NonFiniteLossError, TrainParts, train_one_epoch
from util.train.settings import TrainSettings

# Tensor methods that copy a value to the host (on a GPU each waits for the whole stream).
HOST_READS = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "__format__", "__array__"}


class CountHostReads(TorchFunctionMode):
    """Counts host reads of tensor values, except of the optimizer's step counters (AdamW keeps them on the CPU
    even when training on a GPU, so reading them never waits for the device)."""

    def __init__(self, optimizer):
        super().__init__()
        self.optimizer, self.reads = optimizer, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS and not self._host_counter(args[0]):
            self.reads += 1
        return func(*args, **(kwargs or {}))

    def _host_counter(self, t) -> bool:
        return any(st.get("step") is t for st in self.optimizer.state.values())


def _epoch(steps: int, print_freq: int, poison_step: int | None = None) -> int:
    """Train a small linear model for `steps` steps; returns the host reads counted inside the epoch. Batches carry
    their ids as Python lists, so any counted read is one of a value the step computed."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [(torch.randn(4, 8), [4 * i + j for j in range(4)]) for i in range(steps)]

    class Squares:  # an Objective (util.train.loop)
        tracks_batches = True

        def loss(self, m, batch):
            x, ids = batch
            loss = m(x).pow(2).mean()
            return loss * float("nan") if poison_step is not None and ids[0] == 4 * poison_step else loss

        def batch_ids(self, batch):
            return batch[1]

        def describe(self, batch):
            return [f"vol{i}.nii.gz" for i in batch[1]]

    s = TrainSettings(device="cpu", print_freq=print_freq, batch_size=4)
    with CountHostReads(opt) as counter:
        train_one_epoch(TrainParts(model, model, opt, scaler), batches, 0, s, Squares())
    return counter.reads


def test_the_reads_of_device_values_do_not_grow_with_the_steps_of_an_epoch():
    """With no print step inside the epoch, 6 and 24 steps read the device equally often (only at the end);
    reading the previous step's loss every step (as before) made it 18 reads more."""
    short, long = _epoch(6, print_freq=1000), _epoch(24, print_freq=1000)
    assert short > 0  # the end-of-epoch check and statistics are counted, so the counter works
    assert long == short


def test_print_steps_are_the_only_steady_state_reads():
    every_8 = _epoch(24, print_freq=8)
    none = _epoch(24, print_freq=1000)
    # print steps 0 and 23 are in both runs; 8 and 16 add a few reads each, and the whole epoch reads the device
    # fewer times than it has steps (reading every step's loss, as before, made it 33 reads for 24 steps)
    assert 0 < every_8 - none <= 2 * 4
    assert every_8 < 24


def test_a_nan_loss_between_print_steps_names_its_step_and_files():
    with pytest.raises(NonFiniteLossError) as e:
        _epoch(24, print_freq=1000, poison_step=13)
    msg = str(e.value)
    assert "step 13" in msg and "vol52.nii.gz" in msg and "epoch 1" in msg
    assert isinstance(e.value, UserError)  # one line at the error boundary, not a traceback
