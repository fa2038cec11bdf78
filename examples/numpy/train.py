"""A Ferry node's trainer in NumPy with the Python SDK (no framework): softmax regression on
the site's own CSV files. `DATA_DIR/train.csv` trains, `DATA_DIR/test.csv` is the site's
held-out data for federated evaluation; one row per example: the class label, then the
features (values above 1 are read as 0-255 pixels and scaled to [0, 1]). Works on the tensors
of any model with one 2-D weight [features, classes] and one bias [classes], for example
Ferry's built-in `logreg` or `init_model.py`'s."""

import os

import numpy as np
import ferry_sdk


def read(path):
    """(labels, features) of one of the site's CSV files."""
    rows = np.loadtxt(path, delimiter=",", ndmin=2)
    features = rows[:, 1:]
    return rows[:, 0].astype(np.int64), features / 255.0 if features.max() > 1 else features


# A process may serve many nodes (`ferry simulate`'s pool of workers): the files of the 64
# folders used last are kept, the others read again when their node's next task comes.
examples = {
    name: ferry_sdk.SiteCache(lambda folder, name=name: read(os.path.join(folder, name)), max_sites=64)
    for name in ("train.csv", "test.csv")
}


def split(model):
    """The names of the weight matrix and the bias."""
    weight = next(name for name, t in model.items() if t.ndim == 2)
    bias = next(name for name, t in model.items() if t.ndim == 1)
    return weight, bias


def probabilities(features, w, b):
    logits = features @ w + b
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def train(model, task):
    weight, bias = split(model)
    w, b = model[weight].astype(np.float64), model[bias].astype(np.float64)
    labels, features = examples["train.csv"](task.data_dir)
    onehot = np.eye(w.shape[1])[labels]
    rng = np.random.default_rng(task.seed)
    velocity_w, velocity_b = np.zeros_like(w), np.zeros_like(b)
    losses = []
    for _ in range(task.epochs):
        order = rng.permutation(len(labels))
        for start in range(0, len(order), task.batch_size):
            batch = order[start:start + task.batch_size]
            p = probabilities(features[batch], w, b)
            losses.append(-np.log(np.clip((p * onehot[batch]).sum(axis=1), 1e-12, None)).mean())
            grads = task.local.gradients(  # FedProx's term when the run uses it; counts the step
                {
                    weight: features[batch].T @ (p - onehot[batch]) / len(batch) + task.weight_decay * w,
                    bias: (p - onehot[batch]).mean(axis=0) + task.weight_decay * b,
                },
                {weight: w, bias: b},
            )
            grad_w, grad_b = grads[weight], grads[bias]
            velocity_w = task.momentum * velocity_w + grad_w
            velocity_b = task.momentum * velocity_b + grad_b
            w, b = w - task.lr * velocity_w, b - task.lr * velocity_b
    trained = {weight: w.astype(model[weight].dtype), bias: b.astype(model[bias].dtype)}
    return ferry_sdk.TrainResult(trained, num_examples=len(labels), metrics={"train_loss": float(np.mean(losses))})


def evaluate(model, task):
    weight, bias = split(model)
    labels, features = examples["test.csv"](task.data_dir)
    p = probabilities(features, model[weight].astype(np.float64), model[bias].astype(np.float64))
    loss = float(-np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean())
    accuracy = float((p.argmax(axis=1) == labels).mean())
    return ferry_sdk.EvaluateResult(num_examples=len(labels), loss=loss, accuracy=accuracy)


ferry_sdk.run(train, evaluate)
