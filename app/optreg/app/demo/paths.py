"""The book's figure 6-8 through the service: optimizer paths on f(x, y) = x²/20 + y².

The function is 20 times steeper in y than in x. Every optimizer starts at
(-7, 2) and takes 30 updates, each in its own optreg session; the parameters
x and y are 0-d float64 arrays, updated in place by the client as the book's
dict entries are.
"""
from __future__ import annotations

import numpy as np

from optreg.client import Client

START = (-7.0, 2.0)
UPDATES = 30

# (panel title, optimizer, hyperparameters). SGD, Momentum, AdaGrad and Adam use
# the book's learning rates; RMSProp and Nesterov are not in the book's figure,
# and these rates show them well on this function.
OPTIMIZERS = [
    ("SGD", "sgd", {"lr": 0.95}),
    ("Momentum", "momentum", {"lr": 0.1}),
    ("Nesterov", "nesterov", {"lr": 0.1}),
    ("AdaGrad", "adagrad", {"lr": 1.5}),
    ("RMSprop", "rmsprop", {"lr": 0.15}),
    ("Adam", "adam", {"lr": 0.3}),
]


def f(x, y):
    return x ** 2 / 20.0 + y ** 2


def df(x, y):
    return x / 10.0, 2.0 * y


def run(client: Client, optimizers=OPTIMIZERS, updates: int = UPDATES) -> dict[str, dict]:
    """Each optimizer's path, start included: {title: {"optimizer", "hyperparameters", "path": [[x, y], ...]}}."""
    results = {}
    for title, name, hp in optimizers:
        params = {"x": np.array(START[0]), "y": np.array(START[1])}
        session = client.create_session(name, params, master_dtype="float64", **hp)
        try:
            path = [[float(params["x"]), float(params["y"])]]
            for _ in range(updates):
                gx, gy = df(params["x"], params["y"])
                session.step({"x": np.asarray(gx), "y": np.asarray(gy)})
                path.append([float(params["x"]), float(params["y"])])
        finally:
            session.delete()
        x, y = path[-1]
        results[title] = {"optimizer": name, "hyperparameters": hp, "path": path, "final_f": f(x, y),
                          "start_f": f(*START)}
    return results


def plot(results: dict[str, dict], out_path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.arange(-10, 10, 0.05)
    ys = np.arange(-5, 5, 0.05)
    X, Y = np.meshgrid(xs, ys)
    Z = f(X, Y)
    Z[Z > 7] = 0  # the book's trick: blank out the far contours

    cols = 3 if len(results) > 4 else 2
    rows = -(-len(results) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, (title, r) in zip(axes.flat, results.items()):
        path = np.array(r["path"])
        ax.contour(X, Y, Z, levels=12, colors="0.55", linewidths=0.7)
        ax.plot(path[:, 0], path[:, 1], "o-", color="red", markersize=3, linewidth=1)
        ax.plot(0, 0, "+", color="black", markersize=12, markeredgewidth=2)
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
        lr = r["hyperparameters"].get("lr")
        ax.set_title(f"{title} (lr={lr:g})" if lr is not None else title)
    for ax in list(axes.flat)[len(results):]:
        ax.set_visible(False)
    fig.suptitle(f"f(x, y) = x²/20 + y² from {START}, {len(path) - 1} updates each, through optreg sessions")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
