"""The ClientApp: returns the model it received (no training), as `ferry bench round`'s
synthetic node returns a ready update."""

from flwr.client import ClientApp, NumPyClient
from flwr.common import Context


class NoOp(NumPyClient):
    def fit(self, parameters, config):
        return parameters, 1, {}


def client_fn(context: Context):
    return NoOp().to_client()


app = ClientApp(client_fn=client_fn)
