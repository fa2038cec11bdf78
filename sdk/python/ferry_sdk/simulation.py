"""Simulations started from Python: ``ferry simulate`` runs the federation, and every virtual
node's training and evaluation tasks come back to the functions of the calling process (a
script, a notebook) through a small bridge program, so no trainer script is needed. The round
lines are printed as they come, and the run's history is returned as Python objects."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from .protocol import EvaluateFn, Served, TrainFn
from .tensors import FerryError

#: Lines of ``ferry simulate``'s stderr kept for the error a failed run raises.
_STDERR_LINES = 20


@dataclass
class Simulation:
    """A finished simulation: its folder, its history (``history.json`` as Python objects),
    its rounds, its closing figures and its final model's path."""

    out: str
    history: Dict[str, Any]
    rounds: List[Dict[str, Any]] = field(default_factory=list)
    final: Dict[str, Any] = field(default_factory=dict)
    model_path: Optional[str] = None

    @property
    def federated_accuracy(self) -> List[Optional[float]]:
        """The sites' federated accuracy after each round (``None`` where a round was not
        evaluated by the nodes)."""
        return [(r.get("federated") or {}).get("accuracy") for r in self.rounds]


def find_ferry(ferry: Optional[str] = None) -> str:
    """The ``ferry`` program to run: ``ferry`` if given, else ``$FERRY_BIN``, else the one the
    ``ferry`` wheel installed beside this Python (a notebook's kernel runs a virtual
    environment's Python without its ``bin`` on ``PATH``), else the one on ``PATH``."""
    beside = os.path.join(sysconfig.get_path("scripts"), "ferry")
    candidate = (
        ferry
        or os.environ.get("FERRY_BIN")
        or (beside if os.path.isfile(beside) else None)
        or shutil.which("ferry")
    )
    if not candidate or not os.path.isfile(candidate):
        raise FerryError(
            "the ferry program was not found: `pip install ferry` (a wheel that carries it), put "
            "it on PATH, set FERRY_BIN, or pass ferry='...' (it is built as target/release/ferry "
            "by `cargo build --release`)"
        )
    return candidate


def _flags(settings: Dict[str, Any]) -> List[str]:
    """``ferry simulate`` flags for keyword settings: ``local_epochs=2`` is
    ``--local-epochs 2``, ``True`` is a bare flag, ``False`` and ``None`` are left out, and a
    list is joined with commas."""
    flags = []
    for key, value in settings.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            flags += [flag, ",".join(str(v) for v in value)]
        else:
            flags += [flag, str(value)]
    return flags


class _TaskServer:
    """Serves the bridge programs' task lines to ``served`` on a Unix socket, one task at a time
    (the user's functions, and a PyTorch module, are shared by every virtual node)."""

    def __init__(self, served: Served, path: str) -> None:
        self._served = served
        self._lock = threading.Lock()
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(path)
        self._socket.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:  # closed: the simulation is over
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, connection.makefile("rw") as stream:
            for line in stream:
                with self._lock:
                    answer = self._served.answer(line)
                stream.write(json.dumps(answer) + "\n")
                stream.flush()

    def close(self) -> None:
        self._socket.close()


def simulate_served(
    served: Served,
    *,
    node_data: str,
    initial_model: str,
    rounds: int = 3,
    strategy: str = "fedavg",
    out: Optional[str] = None,
    ferry: Optional[str] = None,
    echo: Callable[[str], None] = print,
    **settings: Any,
) -> Simulation:
    """Runs ``ferry simulate`` with ``served`` as every virtual node's trainer (see
    :func:`simulate`)."""
    program = find_ferry(ferry)
    out = out or tempfile.mkdtemp(prefix="ferry-simulation-")
    bridge_dir = tempfile.mkdtemp(prefix="ferry-bridge-")
    path = os.path.join(bridge_dir, "tasks.sock")
    server = _TaskServer(served, path)
    sdk_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (sdk_root, env.get("PYTHONPATH")) if p)
    command = [
        program,
        "simulate",
        "--trainer-cmd",
        f"{sys.executable} -m ferry_sdk.bridge {path}",
        "--trainer-mode",
        "long-lived",
        "--node-data",
        node_data,
        "--initial-model",
        initial_model,
        "--rounds",
        str(rounds),
        "--strategy",
        strategy,
        "--out",
        out,
    ] + _flags(settings)
    stderr: deque = deque(maxlen=_STDERR_LINES)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
        reader.start()
        for line in process.stdout:
            echo(line.rstrip("\n"))
        status = process.wait()
        reader.join()
    finally:
        server.close()
        shutil.rmtree(bridge_dir, ignore_errors=True)
    if status != 0:
        said = "".join(stderr).strip()
        raise FerryError(f"ferry simulate failed (exit status {status}): {said}")
    with open(os.path.join(out, "history.json")) as f:
        history = json.load(f)
    model = os.path.join(out, "model.safetensors")
    return Simulation(
        out=out,
        history=history,
        rounds=history.get("rounds", []),
        final=history.get("final") or {},
        model_path=model if os.path.exists(model) else None,
    )


def simulate(
    train: TrainFn,
    evaluate: Optional[EvaluateFn] = None,
    *,
    node_data: str,
    initial_model: str,
    rounds: int = 3,
    strategy: str = "fedavg",
    seed_generators: bool = True,
    **settings: Any,
) -> Simulation:
    """Runs a whole federation on this machine with ``train`` and ``evaluate`` (the functions
    :func:`ferry_sdk.run` takes) as every virtual node's trainer, one virtual node per folder
    matching ``node_data`` (``'data/*'``), from the model file ``initial_model``::

        result = ferry_sdk.simulate(train, evaluate, node_data="sites/*",
                                    initial_model="init.safetensors", rounds=5,
                                    strategy="fedprox", mu=0.1, local_epochs=2)
        result.federated_accuracy, result.model_path

    Any other ``ferry simulate`` option is a keyword (``local_epochs=2`` for
    ``--local-epochs 2``); ``out`` names the run's folder (a fresh temporary one by default),
    ``ferry`` the program (else ``$FERRY_BIN`` or ``PATH``), and ``echo`` where each round line
    goes (``print``). The functions run in this process, one task at a time. A run Ferry refuses
    or that fails raises :class:`FerryError` with Ferry's message."""
    return simulate_served(
        Served(train, evaluate, seed=seed_generators),
        node_data=node_data,
        initial_model=initial_model,
        rounds=rounds,
        strategy=strategy,
        **settings,
    )
