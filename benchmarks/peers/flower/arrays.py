"""A PyTorch module's state as the list of NumPy arrays Flower moves, and back."""

import torch


def arrays_of(model):
    """The module's `state_dict` values, in order, as NumPy arrays."""
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


def load_arrays(model, arrays):
    """Loads `arrays` (in `state_dict` order) into the module."""
    model.load_state_dict({k: torch.tensor(a) for k, a in zip(model.state_dict(), arrays)})
