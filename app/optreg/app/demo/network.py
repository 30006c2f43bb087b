"""A multi-layer perceptron in numpy, forward and backward by hand, as the book writes it.

Affine -> ReLU, repeated for each hidden layer, then Affine -> softmax with
cross-entropy loss. Weights use He initialisation (std sqrt(2 / fan_in)), biases
start at zero. Parameters are named as in the book (W1, b1, ..., Wn, bn), float64.
"""
from __future__ import annotations

import numpy as np


class MultiLayerNet:
    def __init__(self, input_size: int, hidden_sizes: list[int], output_size: int, rng: np.random.Generator):
        sizes = [input_size, *hidden_sizes, output_size]
        self.layers = len(sizes) - 1
        self.params: dict[str, np.ndarray] = {}
        for i in range(1, len(sizes)):
            scale = np.sqrt(2.0 / sizes[i - 1])  # He
            self.params[f"W{i}"] = scale * rng.standard_normal((sizes[i - 1], sizes[i]))
            self.params[f"b{i}"] = np.zeros(sizes[i])

    def copy(self) -> "MultiLayerNet":
        other = object.__new__(MultiLayerNet)
        other.layers = self.layers
        other.params = {k: v.copy() for k, v in self.params.items()}
        return other

    def predict(self, x: np.ndarray) -> np.ndarray:
        h = x
        for i in range(1, self.layers):
            h = np.maximum(h @ self.params[f"W{i}"] + self.params[f"b{i}"], 0.0)
        return h @ self.params[f"W{self.layers}"] + self.params[f"b{self.layers}"]

    @staticmethod
    def softmax(a: np.ndarray) -> np.ndarray:
        a = a - a.max(axis=1, keepdims=True)
        e = np.exp(a)
        return e / e.sum(axis=1, keepdims=True)

    @staticmethod
    def cross_entropy(y: np.ndarray, t: np.ndarray) -> float:
        # The book's form: the mean of -log(y + 1e-7) at the labelled class.
        return float(-np.log(y[np.arange(len(t)), t] + 1e-7).mean())

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        return self.cross_entropy(self.softmax(self.predict(x)), t)

    def accuracy(self, x: np.ndarray, t: np.ndarray, batch: int = 2000) -> float:
        correct = 0
        for i in range(0, len(x), batch):
            correct += int((self.predict(x[i:i + batch]).argmax(axis=1) == t[i:i + batch]).sum())
        return correct / len(x)

    def gradient(self, x: np.ndarray, t: np.ndarray) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, gradients by parameter name) for one batch, by backpropagation."""
        inputs, masks = [], []
        h = x
        for i in range(1, self.layers):
            inputs.append(h)
            a = h @ self.params[f"W{i}"] + self.params[f"b{i}"]
            mask = a > 0
            masks.append(mask)
            h = a * mask
        inputs.append(h)
        y = self.softmax(h @ self.params[f"W{self.layers}"] + self.params[f"b{self.layers}"])
        loss = self.cross_entropy(y, t)

        n = len(t)
        d = y.copy()
        d[np.arange(n), t] -= 1.0
        d /= n
        grads: dict[str, np.ndarray] = {}
        for i in range(self.layers, 0, -1):
            grads[f"W{i}"] = inputs[i - 1].T @ d
            grads[f"b{i}"] = d.sum(axis=0)
            if i > 1:
                d = (d @ self.params[f"W{i}"].T) * masks[i - 2]
        return loss, grads
