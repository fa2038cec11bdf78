"""Each strategy's local procedure, applied by the SDK so that the user's training loop need not
know the strategy: FedProx's proximal term (``mu * (w - w_global)`` added to every trainable
tensor's gradient), SCAFFOLD's correction (``c - c_i`` added to every gradient; Ferry keeps the
node's control variate and works out its change) and the count of local steps that FedNova and
SCAFFOLD report. The PyTorch front end applies both to any
loop through gradient hooks; a NumPy loop passes each step's gradients through
:meth:`LocalProcedure.gradients`."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np

from .tensors import FerryError, Model

#: The procedures whose work the SDK does: FedProx's, FedNova's and SCAFFOLD's.
PROXIMAL, NORMALIZED, SCAFFOLD = "proximal", "normalized", "scaffold"

#: q-FedAvg's procedure: the node reports its loss before training, which only its loop knows.
LOSS_REPORTING = "loss_reporting"

#: The procedures that report the local steps taken, by the name Ferry's protocol gives them.
COUNTED = {NORMALIZED: "FedNova", SCAFFOLD: "SCAFFOLD"}


class LocalProcedure:
    """The task's local procedure for a NumPy training loop. Call :meth:`gradients` once per
    local step with the step's gradients and the model as it is before the step::

        for batch in batches:
            grads = my_gradients(model, batch)
            grads = task.local.gradients(grads, model)   # FedProx's term, when the run uses it
            for name in grads:
                model[name] -= task.lr * grads[name]

    Under FedProx the call adds ``mu * (w - w_global)``, under SCAFFOLD the correction
    ``c - c_i``; under every strategy it counts the step, and the count is reported as FedNova's
    and SCAFFOLD's ``steps`` unless ``train`` reports its own."""

    def __init__(
        self, procedure: str, mu: float, global_model: Model, correction: Optional[Model] = None
    ) -> None:
        self.procedure = procedure
        self.mu = float(mu or 0.0)
        self._global = global_model
        self._correction = correction if procedure == SCAFFOLD else None
        #: Local steps taken: calls of :meth:`gradients`.
        self.steps = 0

    def gradients(self, gradients: Dict[str, np.ndarray], model: Model) -> Dict[str, np.ndarray]:
        """``gradients`` with FedProx's proximal term added when the task asks for it (the
        same arrays otherwise); counts one local step."""
        self.steps += 1
        proximal = self.procedure == PROXIMAL and self.mu != 0.0
        if not proximal and self._correction is None:
            return gradients
        out = {}
        for name, grad in gradients.items():
            if name not in self._global:
                raise FerryError(f"gradient '{name}' names no tensor of the global model")
            out[name] = grad
            if proximal:
                out[name] = out[name] + self.mu * (model[name] - self._global[name]).astype(grad.dtype)
            if self._correction is not None and name in self._correction:
                out[name] = out[name] + self._correction[name].astype(grad.dtype)
        return out


def check_applied(procedure: str, mu: float, steps: int, metrics: Dict[str, float], how: str) -> None:
    """Fills in FedNova's and SCAFFOLD's ``steps`` from the ``steps`` counted, and refuses a
    task whose strategy's procedure was never applied (the update would silently be another
    strategy's) or whose result lacks q-FedAvg's ``loss_before``.
    ``how`` says how a loop applies it (the front end's own words)."""
    if procedure in COUNTED and "steps" not in metrics:
        if steps == 0:
            raise FerryError(
                f"the run uses {COUNTED[procedure]}, which needs the number of local steps: "
                f"{how}, or report metrics['steps'] yourself"
            )
        metrics["steps"] = steps
    if procedure == LOSS_REPORTING and "loss_before" not in metrics:
        raise FerryError(
            "the run uses q-FedAvg, which weighs each node by its loss before training: report "
            "metrics['loss_before'], the received model's mean loss on the node's training "
            "data, measured before training"
        )
    if procedure == PROXIMAL and mu and steps == 0:
        raise FerryError(
            f"the run uses FedProx (mu={mu}), but its proximal term was never applied: {how}"
        )


class HookedSteps:
    """Gradient hooks on a PyTorch module's trainable parameters for one task: they add
    FedProx's term when the procedure is proximal and SCAFFOLD's correction (``correction``,
    the task's tensors by name) when it is scaffold, and count backward passes through the module
    (one per local step; a loop that accumulates gradients over several backward passes per
    step reports ``metrics['steps']`` itself)."""

    def __init__(self, module, procedure: str, mu: float, correction: Optional[dict] = None) -> None:
        mu = float(mu or 0.0) if procedure == PROXIMAL else 0.0
        correction = correction if procedure == SCAFFOLD else None
        self.steps = 0
        self._handles = []
        trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for index, (name, parameter) in enumerate(trainable):
            anchor: Optional[object] = parameter.detach().clone() if mu else None
            shift = None
            if correction is not None and name in correction:
                shift = correction[name].to(dtype=parameter.dtype, device=parameter.device)
            self._handles.append(
                parameter.register_hook(self._hook(parameter, anchor, mu, shift, counts=index == 0))
            )

    def _hook(self, parameter, anchor, mu: float, shift, counts: bool):
        def hook(grad):
            if counts:
                self.steps += 1
            if anchor is not None:
                grad = grad + mu * (parameter.detach() - anchor)
            if shift is not None:
                grad = grad + shift
            return grad

        return hook

    def remove(self) -> None:
        """Takes the hooks off the module (a long-lived trainer's next task sets its own)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
