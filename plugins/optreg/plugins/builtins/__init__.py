"""The built-in optimizers, one plugin module each: the book's (Deep Learning from
Scratch, chapter 6) under plain names, and torch.optim's (2.13) under names that say
so (`torch.adam`, `adamw`, `torch.sgd`, `torch.rmsprop`, `torch.adagrad`, `torch.adafactor`,
`torch.muon`), `adamw-bf16` (adamw with bfloat16 state) and `schedulefree.adamw` (PyPI schedulefree).

Each module is an ordinary plugin of the same hook as any third-party package; the
registry registers them from this list so a bare checkout works without entry points.
"""
MODULES = [
    "optreg.plugins.builtins.schedules",  # the learning-rate schedules (the optreg_schedules hook)
    "optreg.plugins.builtins.sgd",
    "optreg.plugins.builtins.momentum",
    "optreg.plugins.builtins.nesterov",
    "optreg.plugins.builtins.adagrad",
    "optreg.plugins.builtins.rmsprop",
    "optreg.plugins.builtins.adam",
    "optreg.plugins.builtins.torch_adam",
    "optreg.plugins.builtins.adamw",
    "optreg.plugins.builtins.torch_sgd",
    "optreg.plugins.builtins.torch_rmsprop",
    "optreg.plugins.builtins.torch_adagrad",
    "optreg.plugins.builtins.torch_adafactor",
    "optreg.plugins.builtins.torch_muon",
    "optreg.plugins.builtins.adamw_bf16",
    "optreg.plugins.builtins.schedulefree_adamw",
]

# The book adds this outside the square root in AdaGrad, RMSProp and Adam; it is
# not a hyperparameter there.
BOOK_EPS = 1e-7


def unchanged(p, state, last, now, hp):
    """catch_up of an optimizer whose step with a zero gradient changes nothing (SGD, AdaGrad): exact."""


def geometric(ratio: float, d):
    """(ratio^d, ratio + ratio^2 + ... + ratio^d) per row, in float64, for d = missed steps (int64 array).
    `ratio` is the constant as the kernel sees it (rounded to the array dtype), so the factor is the one
    d dense steps multiply by; only the rounding of the d steps differs."""
    import numpy as np

    f = np.power(ratio, d.astype(np.float64))
    s = d.astype(np.float64) if ratio == 1.0 else ratio * (1.0 - f) / (1.0 - ratio)
    return f, s
