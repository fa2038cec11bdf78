"""Each strategy's local procedure, applied by the SDK so that the user's training loop need not
know the strategy: FedProx's proximal term (``mu * (w - w_global)`` added to every trainable
tensor's gradient) and FedNova's count of local steps. The PyTorch front end applies both to any
loop through gradient hooks; a NumPy loop passes each step's gradients through
:meth:`LocalProcedure.gradients`."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .tensors import FerryError, Model

#: The procedures whose work the SDK does: FedProx's and FedNova's.
PROXIMAL, NORMALIZED = "proximal", "normalized"


class LocalProcedure:
    """The task's local procedure for a NumPy training loop. Call :meth:`gradients` once per
    local step with the step's gradients and the model as it is before the step::

        for batch in batches:
            grads = my_gradients(model, batch)
            grads = task.local.gradients(grads, model)   # FedProx's term, when the run uses it
            for name in grads:
                model[name] -= task.lr * grads[name]

    Under FedProx the call adds ``mu * (w - w_global)``; under every strategy it counts the step,
    and the count is reported as FedNova's ``steps`` unless ``train`` reports its own."""

    def __init__(self, procedure: str, mu: float, global_model: Model) -> None:
        self.procedure = procedure
        self.mu = float(mu or 0.0)
        self._global = global_model
        #: Local steps taken: calls of :meth:`gradients`.
        self.steps = 0

    def gradients(self, gradients: Dict[str, np.ndarray], model: Model) -> Dict[str, np.ndarray]:
        """``gradients`` with FedProx's proximal term added when the task asks for it (the
        same arrays otherwise); counts one local step."""
        self.steps += 1
        if self.procedure != PROXIMAL or self.mu == 0.0:
            return gradients
        out = {}
        for name, grad in gradients.items():
            if name not in self._global:
                raise FerryError(f"gradient '{name}' names no tensor of the global model")
            out[name] = grad + self.mu * (model[name] - self._global[name]).astype(grad.dtype)
        return out


def check_applied(procedure: str, mu: float, steps: int, metrics: Dict[str, float], how: str) -> None:
    """Fills in FedNova's ``steps`` from the ``steps`` counted, and refuses a task whose
    strategy's procedure was never applied: the update would silently be another strategy's.
    ``how`` says how a loop applies it (the front end's own words)."""
    if procedure == NORMALIZED and "steps" not in metrics:
        if steps == 0:
            raise FerryError(
                f"the run uses FedNova, which needs the number of local steps: {how}, or report "
                "metrics['steps'] yourself"
            )
        metrics["steps"] = steps
    if procedure == PROXIMAL and mu and steps == 0:
        raise FerryError(
            f"the run uses FedProx (mu={mu}), but its proximal term was never applied: {how}"
        )


class HookedSteps:
    """Gradient hooks on a PyTorch module's trainable parameters for one task: they add
    FedProx's term when the procedure is proximal, and count backward passes through the module
    (one per local step; a loop that accumulates gradients over several backward passes per
    step reports ``metrics['steps']`` itself)."""

    def __init__(self, module, procedure: str, mu: float) -> None:
        mu = float(mu or 0.0) if procedure == PROXIMAL else 0.0
        self.steps = 0
        self._handles = []
        trainable = [p for p in module.parameters() if p.requires_grad]
        for index, parameter in enumerate(trainable):
            anchor: Optional[object] = parameter.detach().clone() if mu else None
            self._handles.append(
                parameter.register_hook(self._hook(parameter, anchor, mu, counts=index == 0))
            )

    def _hook(self, parameter, anchor, mu: float, counts: bool):
        def hook(grad):
            if counts:
                self.steps += 1
            if anchor is None:
                return grad
            return grad + mu * (parameter.detach() - anchor)

        return hook

    def remove(self) -> None:
        """Takes the hooks off the module (a long-lived trainer's next task sets its own)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
