"""The built-in optimizers, one plugin module each: the book's (Deep Learning from
Scratch, chapter 6) under plain names, and torch.optim's (2.13) under names that say
so (`torch.adam`, `adamw`, `torch.sgd`, `torch.rmsprop`, `torch.adagrad`).

Each module is an ordinary plugin of the same hook as any third-party package; the
registry registers them from this list so a bare checkout works without entry points.
"""
MODULES = [
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
]

# The book adds this outside the square root in AdaGrad, RMSProp and Adam; it is
# not a hyperparameter there.
BOOK_EPS = 1e-7
