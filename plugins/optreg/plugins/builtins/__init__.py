"""The book's optimizers (Deep Learning from Scratch, chapter 6), one plugin module each.

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
]

# The book adds this outside the square root in AdaGrad, RMSProp and Adam; it is
# not a hyperparameter there.
BOOK_EPS = 1e-7
