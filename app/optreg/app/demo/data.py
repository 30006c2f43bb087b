"""The demo's data: always real images, never synthetic.

In order of preference:
1. MNIST (or any MNIST-format set) from IDX files in `--data DIR`, named as the
   book's loader saves them (train-images-idx3-ubyte[.gz], ...);
2. Fashion-MNIST from Debian's `dataset-fashion-mnist` package
   (`apt install dataset-fashion-mnist` puts it in /usr/share/datasets/fashion-mnist);
3. the 8x8 handwritten digits that ship inside scikit-learn (`load_digits`).

Images come back flattened, as float64 in [0, 1] (the book's normalize=True);
labels as int64 class indices.
"""
from __future__ import annotations

import gzip
import pathlib
from dataclasses import dataclass

import numpy as np

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "t_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "t_test": "t10k-labels-idx1-ubyte",
}


@dataclass
class Dataset:
    name: str  # what it is, short: figure titles and summaries
    x_train: np.ndarray
    t_train: np.ndarray
    x_test: np.ndarray
    t_test: np.ndarray
    source: str = ""  # where it came from, for describe()

    @property
    def input_size(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        return int(max(self.t_train.max(), self.t_test.max())) + 1

    def describe(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return (f"{self.name}{where}: {len(self.x_train):,} training and {len(self.x_test):,} test images "
                f"of {self.input_size} pixels, {self.classes} classes")


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (directory / stem, directory / (stem + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: pathlib.Path) -> np.ndarray:
    """One IDX file (optionally gzipped) as an array of its declared shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: element type 0x{raw[2]:02x} not supported (only unsigned bytes)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    start = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=start)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {data.size} bytes of data, header says {shape}")
    return data.reshape(shape)


# The first ten training labels of the two public IDX sets, in their published order: enough to name what
# --data holds (both are 60,000 28x28 images of 10 classes; a directory's name need not say which).
KNOWN_IDX_SETS = {(5, 0, 4, 1, 9, 2, 1, 3, 1, 4): "MNIST", (9, 0, 0, 3, 0, 2, 7, 2, 5, 5): "Fashion-MNIST"}


def load_idx_dir(directory: pathlib.Path, name: str | None = None, source: str = "") -> Dataset:
    """The four IDX files in `directory`; `name` None: MNIST or Fashion-MNIST by its labels, else the folder's name."""
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = _find(directory, stem)
        if path is None:
            raise FileNotFoundError(f"{directory}: missing {stem} (or {stem}.gz); expected the four MNIST IDX files "
                                    f"{', '.join(IDX_FILES.values())}")
        arrays[key] = read_idx(path)
    x_train = arrays["x_train"].reshape(len(arrays["x_train"]), -1).astype(np.float64) / 255.0
    x_test = arrays["x_test"].reshape(len(arrays["x_test"]), -1).astype(np.float64) / 255.0
    if name is None:
        name = KNOWN_IDX_SETS.get(tuple(arrays["t_train"][:10].tolist()), f"IDX data set {directory.name}")
    return Dataset(name, x_train, arrays["t_train"].astype(np.int64), x_test, arrays["t_test"].astype(np.int64),
                   source or f"IDX files in {directory}")


def load_digits_dataset() -> Dataset:
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    t = digits.target.astype(np.int64)
    # A fixed, shuffled split: 1,497 to train on, 300 to test.
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:300], order[300:]
    return Dataset("scikit-learn digits", x[train], t[train], x[test], t[test], "8x8 handwritten digits, load_digits")


CHOICES = ("auto", "fashion-mnist", "digits")


def load(data_dir: str | None = None, which: str = "auto", fashion_dir: pathlib.Path = FASHION_DIR) -> Dataset:
    """The data set the demo trains on; see the module docstring for the order `auto` follows."""
    if data_dir:
        directory = pathlib.Path(data_dir)
        return load_idx_dir(directory)
    fashion_installed = all(_find(fashion_dir, stem) for stem in IDX_FILES.values())
    if which == "fashion-mnist" and not fashion_installed:
        raise FileNotFoundError(f"Fashion-MNIST is not in {fashion_dir}: apt install dataset-fashion-mnist")
    if which in ("auto", "fashion-mnist") and fashion_installed:
        return load_idx_dir(fashion_dir, "Fashion-MNIST", f"Debian dataset-fashion-mnist, {fashion_dir}")
    try:
        return load_digits_dataset()
    except ImportError:
        raise RuntimeError("no data set: give MNIST IDX files with --data DIR, apt install dataset-fashion-mnist, "
                           "or pip install scikit-learn for its digits") from None
