#!/usr/bin/env python3
"""Logistic regression on CSV files, as a Ferry external-command trainer in plain NumPy (no
SDK, no framework): the raw protocol of docs/exec-trainer.md.

Ferry runs `python3 train.py TASK_JSON` once per task, or, with `--trainer-mode long-lived`,
starts it once and writes each task as a JSON line to its stdin; this script serves both. A
training task (`"kind": "train"`) reads the global model (one weight matrix [features, classes]
and one bias [classes]), trains it with mini-batch SGD on DATA_DIR/train.csv (one row per
example: the class label, then the features; features above 1 are read as 0-255 pixel values
and scaled to [0, 1]), and writes the trained model and the result where the task says. An
evaluation task (`"kind": "evaluate"`) scores the global model on DATA_DIR/test.csv, the site's
held-out examples, and writes the figures.

Needs numpy and the safetensors package.
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


_DATA = {}


def load_data(data_dir, file):
    """(labels, features) of one of the node's CSV files; a long-lived process reads each once
    for the whole run."""
    path = os.path.join(data_dir, file)
    if path not in _DATA:
        data = np.loadtxt(path, delimiter=",", ndmin=2)
        features = data[:, 1:]
        if features.max() > 1.0:
            features = features / 255.0
        _DATA[path] = (data[:, 0].astype(np.int64), features)
    return _DATA[path]


def load_model(path):
    """(weight name, weight, bias name, bias) of the global model, in float64."""
    tensors = load_file(path)
    weight_name = next(name for name, t in tensors.items() if t.ndim == 2)
    bias_name = next(name for name, t in tensors.items() if t.ndim == 1)
    return (weight_name, tensors[weight_name].astype(np.float64),
            bias_name, tensors[bias_name].astype(np.float64))


def evaluate(task):
    _, w, _, b = load_model(task["model_in"])
    labels, features = load_data(task["data_dir"], "test.csv")
    p = softmax(features @ w + b)
    loss = -np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None)).mean()
    accuracy = (p.argmax(axis=1) == labels).mean()
    with open(task["result_out"], "w") as f:
        json.dump({"num_examples": int(len(labels)), "loss": float(loss),
                   "accuracy": float(accuracy)}, f)


def train(task):
    weight_name, w, bias_name, b = load_model(task["model_in"])
    w_global, b_global = w.copy(), b.copy()

    labels, features = load_data(task["data_dir"], "train.csv")
    classes = w.shape[1]
    onehot = np.eye(classes)[labels]

    lr, momentum, decay = task["lr"], task["momentum"], task["weight_decay"]
    mu = task["mu"] if task["procedure"] == "proximal" else 0.0
    rng = np.random.default_rng(task["seed"])
    velocity_w, velocity_b = np.zeros_like(w), np.zeros_like(b)
    steps, loss_sum = 0, 0.0
    for _ in range(task["epochs"]):
        order = rng.permutation(len(labels))
        for start in range(0, len(order), task["batch_size"]):
            batch = order[start:start + task["batch_size"]]
            x, y = features[batch], onehot[batch]
            p = softmax(x @ w + b)
            loss_sum += -np.log(np.clip((p * y).sum(axis=1), 1e-12, None)).mean()
            grad_w = x.T @ (p - y) / len(batch) + decay * w + mu * (w - w_global)
            grad_b = (p - y).mean(axis=0) + decay * b + mu * (b - b_global)
            velocity_w = momentum * velocity_w + grad_w
            velocity_b = momentum * velocity_b + grad_b
            w -= lr * velocity_w
            b -= lr * velocity_b
            steps += 1

    save_file({weight_name: w.astype(np.float32), bias_name: b.astype(np.float32)}, task["model_out"])
    with open(task["result_out"], "w") as f:
        json.dump({"num_examples": int(len(labels)),
                   "metrics": {"train_loss": loss_sum / max(steps, 1), "steps": steps}}, f)


def handle(task):
    """Trains or evaluates, as the task's kind says."""
    if task.get("kind") == "evaluate":
        evaluate(task)
    else:
        train(task)


def serve():
    """Long-lived mode: one task per stdin line, one protocol line per answer on stdout."""
    for line in sys.stdin:
        task = json.loads(line)
        try:
            handle(task)
            answer = {"ferry": "done"}
        except Exception as error:  # the node reports it as this round's failure
            answer = {"ferry": "error", "message": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    if os.environ.get("FERRY_TRAINER") == "long-lived":
        serve()
    else:
        with open(sys.argv[-1]) as f:
            handle(json.load(f))
