"""Training that survives a restart mid-round: a PyTorch training loop saves its progress in the
task's checkpoint folder every so many steps or seconds, and the same task started again (the
trainer was killed, or the node restarted while the round was open) goes on from the last save
instead of from the start, ending with the model an uninterrupted run would have ended with."""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

from .protocol import Task
from .tensors import FerryError

#: The file a checkpoint is kept in, inside the task's ``checkpoint_dir``.
CHECKPOINT_FILE = "ferry-checkpoint.pt"


def _random_states(generators: Sequence[torch.Generator]) -> Dict[str, Any]:
    """The state of every random generator a training loop may draw from."""
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: Dict[str, Any], generators: Sequence[torch.Generator]) -> None:
    """Puts every generator back where :func:`_random_states` saw it."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if len(states["generators"]) != len(generators):
        raise FerryError(
            f"the checkpoint holds {len(states['generators'])} generator(s), the loop passes "
            f"{len(generators)}: pass the same generators= as when it was saved"
        )
    for generator, state in zip(generators, states["generators"]):
        generator.set_state(state)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Checkpoint:
    """Saves a training task's progress and restores it when the task is started again::

        optimizer = torch.optim.SGD(module.parameters(), lr=task.lr, momentum=task.momentum)
        order = torch.Generator().manual_seed(task.seed)
        checkpoint = pytorch.Checkpoint(task, module, optimizer, every_steps=50,
                                        generators=[order])
        for epoch in checkpoint.epochs():
            for batch in checkpoint.batches(torch.randperm(n, generator=order).split(task.batch_size)):
                ...  # one optimizer step on `batch`
                checkpoint.values["loss_sum"] = checkpoint.values.get("loss_sum", 0.0) + loss.item()

    A save holds the module's and the optimizer's state, the position (epoch, and batches done
    in it), ``values`` (the loop's own running figures), and the random generators: Python's,
    NumPy's, PyTorch's (and CUDA's) and the ``generators`` passed, both as they were when the
    epoch began and as they are now. Started again on the same task, the module, optimizer and
    ``values`` come back at once; :meth:`epochs` starts at the saved epoch with the generators
    as they were when it began (so the epoch's shuffle is drawn again the same), and
    :meth:`batches` passes over the batches already done and puts the generators back where
    the save left them, so the rest of the run draws what it would have drawn.

    Saves happen after every ``every_steps`` batches, or once ``every_seconds`` have passed since
    the last save, whichever comes first (every 60 seconds when neither is given). Each save
    replaces the last atomically: a process killed mid-save leaves the previous one whole.
    Without a checkpoint folder (an older Ferry) nothing is saved and training starts over.
    """

    def __init__(
        self,
        task: Task,
        module: torch.nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        *,
        every_steps: Optional[int] = None,
        every_seconds: Optional[float] = None,
        generators: Sequence[torch.Generator] = (),
    ) -> None:
        if every_steps is None and every_seconds is None:
            every_seconds = 60.0
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise FerryError(f"every_steps must be an integer >= 1, got {every_steps!r}")
        if every_seconds is not None and not every_seconds > 0:
            raise FerryError(f"every_seconds must be a positive number, got {every_seconds!r}")
        self._task = task
        self._module = module
        self._optimizer = optimizer
        self._every_steps = every_steps
        self._every_seconds = every_seconds
        self._generators: List[torch.Generator] = list(generators)
        self._path = (
            os.path.join(task.checkpoint_dir, CHECKPOINT_FILE) if task.checkpoint_dir else None
        )
        self._last_save = time.monotonic()
        self._epoch_start: Optional[Dict[str, Any]] = None
        #: The loop's own running figures (sums, counts), saved and restored with the rest.
        self.values: Dict[str, Any] = {}
        #: The epoch under way.
        self.epoch = 0
        #: Batches done in the epoch under way.
        self.batch = 0
        #: Batches done in the whole task.
        self.step = 0
        #: Whether this start resumed from a save.
        self.resumed = False
        self._pending: Optional[Dict[str, Any]] = None
        self._restore()

    def _restore(self) -> None:
        if self._path is None or not os.path.exists(self._path):
            return
        # The file is this node's own, written by this code into the node's state folder (a
        # pickle: the folder must be writable by the node's user alone, as Ferry makes it).
        saved = torch.load(self._path, weights_only=False)
        self._module.load_state_dict(saved["module"])
        if self._optimizer is not None:
            if saved["optimizer"] is None:
                raise FerryError("the checkpoint was saved without an optimizer; pass none, or start over")
            self._optimizer.load_state_dict(saved["optimizer"])
        self.values = dict(saved["values"])
        self.epoch, self.batch, self.step = saved["epoch"], saved["batch"], saved["step"]
        self._pending = saved
        self.resumed = True
        print(
            f"resuming round {self._task.round} from its checkpoint: epoch {self.epoch}, "
            f"batch {self.batch} ({self.step} steps done)",
            file=sys.stderr,
            flush=True,
        )

    def epochs(self, count: Optional[int] = None) -> Iterator[int]:
        """The epochs left, from the saved one on a resumed start (``count`` defaults to the
        task's ``epochs``)."""
        count = self._task.epochs if count is None else count
        for epoch in range(self.epoch, count):
            if self._pending is not None and self._pending["epoch"] == epoch:
                _set_random_states(self._pending["epoch_start"], self._generators)
                self._epoch_start = self._pending["epoch_start"]
            else:
                self._epoch_start = _random_states(self._generators)
                self.batch = 0
            self.epoch = epoch
            yield epoch

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """The epoch's batches not yet done; each one handed out counts as a step once the
        loop asks for the next, and may be followed by a save."""
        skip = self._pending["batch"] if self._pending is not None else 0
        seen = 0
        for index, batch in enumerate(batches):
            seen = index + 1
            if index < skip:
                continue
            self._resume_generators()
            yield batch
            self.batch, self.step = index + 1, self.step + 1
            if self._due():
                self.save()
        if seen < skip:
            raise FerryError(
                f"the checkpoint is at batch {skip} of epoch {self.epoch}, but the epoch has only "
                f"{seen} batches now: the data changed since it was saved"
            )
        # A save at an epoch's last batch: nothing was left to hand out.
        self._resume_generators()

    def _resume_generators(self) -> None:
        if self._pending is not None:
            _set_random_states(self._pending["now"], self._generators)
            self._pending = None

    def _due(self) -> bool:
        if self._every_steps is not None and self.step % self._every_steps == 0:
            return True
        return (
            self._every_seconds is not None
            and time.monotonic() - self._last_save >= self._every_seconds
        )

    def save(self) -> None:
        """Saves the progress now (the loop's schedule calls it; call it yourself at any point
        between batches)."""
        self._last_save = time.monotonic()
        if self._path is None:
            return
        state = {
            "module": self._module.state_dict(),
            "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
            "values": dict(self.values),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_start": self._epoch_start or _random_states(self._generators),
            "now": _random_states(self._generators),
        }
        partial = self._path + ".partial"
        with open(partial, "wb") as out:
            torch.save(state, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self._path)
        folder = os.open(os.path.dirname(self._path), os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
