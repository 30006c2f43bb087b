"""`optreg demo --quick` end to end, plus the demo's own numpy parts.

The demo runs as a subprocess (`python -m optreg.app demo`), with its
in-process server; the checks read the summary.json it writes beside the
figures, not its human-readable output.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SOURCE_ROOTS

pytest.importorskip("matplotlib", reason="optreg demo needs the demo extra: pip install 'optreg[demo]'")

ADAPTIVE = ("AdaGrad", "Adam", "RMSprop")


@pytest.fixture(scope="module", params=["digits", "fashion-mnist"])
def quick_demo(request, tmp_path_factory):
    """The quick demo on scikit-learn's digits (always there) and on Fashion-MNIST where installed."""
    from optreg.app.demo.data import FASHION_DIR, IDX_FILES, _find
    if request.param == "fashion-mnist" and not all(_find(FASHION_DIR, stem) for stem in IDX_FILES.values()):
        pytest.skip(f"Fashion-MNIST is not in {FASHION_DIR} (apt install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    done = subprocess.run([sys.executable, "-m", "optreg.app", "demo", "--quick", "--no-progress",
                           "--dataset", request.param, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"optreg demo --quick failed:\n{done.stdout}\n{done.stderr}"
    return out, json.loads((out / "summary.json").read_text()), done.stdout


def test_demo_writes_both_figures(quick_demo):
    out, summary, _ = quick_demo
    for name in ("paths.png", "training.png"):
        png = out / name
        assert png.is_file(), f"{name} missing"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{name} is not a PNG"
        assert png.stat().st_size > 10_000, f"{name} is suspiciously small"
    assert summary["figures"] == {"paths": str(out / "paths.png"), "training": str(out / "training.png")}


def test_training_figure_axes_fit_the_data(quick_demo):
    _, summary, _ = quick_demo
    training = summary["training"]
    axes = training["axes"]
    assert axes["iteration_range"] == [0, training["iterations"] - 1]
    assert axes["accuracy_range"][0] == 0  # from zero: close accuracies look close
    finals = [r["final_loss"] for r in training["optimizers"].values()]
    # log exactly when the final losses are far apart (the digits: SGD ~0.7, the adaptive ones ~0.01)
    assert axes["loss_scale"] == ("log" if max(finals) / min(finals) > 5 else "linear"), finals
    low, high = axes["loss_range"]
    assert low <= min(finals) and high >= max(r["initial_loss"] for r in training["optimizers"].values()) / 2


def test_demo_writes_into_its_own_folder_by_default():
    from optreg.app.cli import build_parser
    args = build_parser().parse_args(["demo"])
    assert args.out == "optreg-demo"


def test_log_scale_and_iterations_follow_the_data():
    from optreg.app.demo import training
    from optreg.app.demo.data import Dataset
    assert training.use_log_scale([0.74, 0.06, 0.015, 0.019, 0.013])  # digits after 200 iterations
    assert not training.use_log_scale([0.438, 0.320, 0.313, 0.298, 0.306])  # Fashion-MNIST after 2,000
    small = Dataset("small", np.zeros((1497, 64)), np.zeros(1497, int), np.zeros((300, 64)), np.zeros(300, int))
    large = Dataset("large", np.zeros((60000, 1)), np.zeros(60000, int), np.zeros((10, 1)), np.zeros(10, int))
    assert training.default_iterations(small) == training.SMALL_SET_ITERATIONS
    assert training.default_iterations(large) == training.ITERATIONS


def test_demo_names_its_data_set(quick_demo):
    _, summary, stdout = quick_demo
    assert summary["dataset"]
    assert summary["dataset"] in stdout


def test_every_path_approaches_the_minimum(quick_demo):
    _, summary, _ = quick_demo
    paths = summary["paths"]
    assert set(paths) == {"SGD", "Momentum", "Nesterov", "AdaGrad", "RMSprop", "Adam"}
    for title, p in paths.items():
        assert p["final_f"] < p["start_f"] / 10, (title, p)
    # the book's rates, as the figure shows them
    assert {t: paths[t]["hyperparameters"]["lr"] for t in ("SGD", "Momentum", "AdaGrad", "Adam")} == \
        {"SGD": 0.95, "Momentum": 0.1, "AdaGrad": 1.5, "Adam": 0.3}


def test_each_optimizer_lowered_the_loss_and_sgd_is_slowest(quick_demo):
    _, summary, _ = quick_demo
    runs = summary["training"]["optimizers"]
    assert set(runs) == {"SGD", "Momentum", "AdaGrad", "Adam", "RMSprop"}
    for title, r in runs.items():
        assert r["final_loss"] < r["initial_loss"], (title, r["initial_loss"], r["final_loss"])
        assert 0.0 <= r["test_accuracy"] <= 1.0
        assert r["steps_per_second"] > 0
    for title in ADAPTIVE:
        assert runs["SGD"]["final_loss"] > runs[title]["final_loss"], (title, runs["SGD"], runs[title])


# --- the demo's parts, in process -------------------------------------------------

def test_backprop_matches_numerical_gradient():
    from optreg.app.demo.network import MultiLayerNet
    rng = np.random.default_rng(1)
    net = MultiLayerNet(5, [4, 3], 3, rng)
    for k in net.params:  # biases away from zero so no ReLU sits on its kink
        if k.startswith("b"):
            net.params[k] += 0.1
    x = rng.standard_normal((6, 5))
    t = rng.integers(0, 3, 6)
    loss, grads = net.gradient(x, t)
    assert loss == pytest.approx(net.loss(x, t), rel=1e-12)

    def exact_loss():
        # The book's loss adds 1e-7 inside the log; its backward pass (y - t) is the
        # gradient of the loss without it, so compare against that.
        y = net.softmax(net.predict(x))
        return -np.log(y[np.arange(len(t)), t]).mean()

    h = 1e-6
    for name, p in net.params.items():
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = exact_loss()
            p[i] = old - h
            down = exact_loss()
            p[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def test_idx_files_are_read_as_the_books_loader_saves_them(tmp_path):
    from optreg.app.demo.data import load
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (7, 28, 28))
    t_train = rng.integers(0, 10, 7)
    x_test = rng.integers(0, 256, (3, 28, 28))
    t_test = np.arange(3)
    _write_idx(tmp_path / "train-images-idx3-ubyte", x_train, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", t_train, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", x_test, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", t_test, gz=False)
    d = load(str(tmp_path))
    # Neither MNIST's nor Fashion-MNIST's labels: named by its folder, short; the path is where it came from.
    assert d.name == f"IDX data set {tmp_path.name}" and str(tmp_path) in d.describe()
    assert d.x_train.shape == (7, 784) and d.x_test.shape == (3, 784)
    np.testing.assert_array_equal(d.x_train, x_train.reshape(7, -1) / 255.0)
    np.testing.assert_array_equal(d.t_train, t_train)
    np.testing.assert_array_equal(d.t_test, t_test)


def test_missing_idx_file_is_named(tmp_path):
    from optreg.app.demo.data import load
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load(str(tmp_path))


def test_demo_with_four_workers_trains_one_session(tmp_path):
    """`optreg demo --workers 4 --quick`: four worker processes train the network through one sync session
    (every round combines all four), against one worker alone; the figure and workers.json are written."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    done = subprocess.run([sys.executable, "-m", "optreg.app", "demo", "--workers", "4", "--quick", "--iterations",
                           "12", "--no-progress", "--dataset", "digits", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, f"optreg demo --workers 4 failed:\n{done.stdout}\n{done.stderr}"
    png = tmp_path / "workers.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads((tmp_path / "workers.json").read_text())
    many, one = summary["runs"]["many"], summary["runs"]["one"]
    assert (many["workers"], many["rounds"], one["workers"], one["rounds"]) == (4, 12, 1, 12)
    assert many["contributions_per_round"] == [4]  # every round had every worker's contribution
    assert many["last_round"]["contributors"] == ["w0", "w1", "w2", "w3"] and many["last_round"]["noise_scale"] > 0
    assert len(many["losses"]) == len(one["losses"]) == 12
    assert many["losses"][-1] < many["losses"][0] and one["losses"][-1] < one["losses"][0]
    assert "every round combined 4 contributions" in done.stdout


def test_demo_diloco_trains_four_workers_against_sync_data_parallel(tmp_path):
    """`optreg demo --workers 4 --diloco --quick`: four worker processes train the network with DiLoCo and,
    on the same samples, with synchronous data parallel; diloco.png and diloco.json hold the loss per step
    and the bytes the Step calls carried, DiLoCo's a fraction of sync DP's. --diloco alone is refused."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [env.get("PYTHONPATH", "")])
    env["MPLBACKEND"] = "Agg"
    args = [sys.executable, "-m", "optreg.app", "demo", "--quick", "--iterations", "12", "--no-progress",
            "--dataset", "digits", "--out", str(tmp_path)]
    alone = subprocess.run(args + ["--diloco"], capture_output=True, text=True, env=env, timeout=300)
    assert alone.returncode != 0 and "give --workers N as well" in alone.stderr + alone.stdout
    done = subprocess.run(args + ["--workers", "4", "--diloco"], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, f"optreg demo --workers 4 --diloco failed:\n{done.stdout}\n{done.stderr}"
    png = tmp_path / "diloco.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = json.loads((tmp_path / "diloco.json").read_text())
    loco, sync = summary["runs"]["diloco"], summary["runs"]["sync"]
    assert summary["every"] == 2 and (loco["rounds"], sync["rounds"]) == (6, 12)  # 12 steps, a sync every 2
    assert len(loco["losses"]) == len(sync["losses"]) == 12 and loco["losses"][-1] < loco["losses"][0]
    assert loco["bytes"] == sorted(loco["bytes"]) and loco["bytes"][-1] > 0
    # a sync every 2 steps, int8 up and bf16 down, against float64 up and down every step
    assert summary["bytes_per_worker_step"]["diloco"] < summary["bytes_per_worker_step"]["sync"] / 5
    assert "DiLoCo sent" in done.stdout
