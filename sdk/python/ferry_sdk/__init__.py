"""Ferry's Python SDK: write a node's trainer as one function.

A Ferry node hands each round's training to your program (``ferry client --trainer-cmd``, or
``ferry simulate --trainer-cmd``). With this SDK the program is::

    import ferry_sdk

    def train(model, task):
        # model: {tensor name: numpy array}, the round's global model
        # task: ferry_sdk.Task (round, epochs, lr, batch_size, data_dir, ...)
        ...
        return ferry_sdk.TrainResult(model=new_model, num_examples=n, metrics={"train_loss": l})

    def evaluate(model, task):
        # score the round's global model on the node's held-out data
        return ferry_sdk.EvaluateResult(num_examples=n, loss=l, accuracy=a)

    ferry_sdk.run(train, evaluate)

``run`` serves both of Ferry's modes (a process per round, or ``--trainer-mode long-lived``)
and checks what ``train`` returns before anything is uploaded. PyTorch users can work on an
``nn.Module`` directly with :func:`ferry_sdk.pytorch.run`. A process that serves many nodes
(a simulation's pool of workers) keeps their data with :class:`ferry_sdk.SiteCache`.
"""

from .protocol import EvaluateResult, EvaluateTask, Task, TrainResult, run
from .simulation import Simulation, simulate
from .site_cache import SiteCache
from .tensors import FerryError, load_model, save_model

__all__ = [
    "EvaluateResult",
    "EvaluateTask",
    "FerryError",
    "Simulation",
    "SiteCache",
    "Task",
    "TrainResult",
    "run",
    "simulate",
    "load_model",
    "save_model",
]
