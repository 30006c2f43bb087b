"""Drop-in replacements for the book's optimizer classes, their state living in optreg.

    optimizer = Adam(lr=0.001, address="127.0.0.1:50051")
    for i in range(iters):
        grads = network.gradient(x_batch, t_batch)
        optimizer.update(network.params, grads)   # as in the book

The first `update` opens a session from the arrays it is given (their dtype becomes
the master dtype: the book works in float64); each `update` writes the new values
into those same arrays.
"""
from __future__ import annotations

import os

from optreg.client.client import Client, Session

DEFAULT_ADDRESS = os.environ.get("OPTREG_ADDRESS", "127.0.0.1:50051")


class _ServiceOptimizer:
    optimizer = ""

    def __init__(self, address: str | None = None, client: Client | None = None, **hyperparameters):
        self._own_client = client is None
        self.client = client or Client(address or DEFAULT_ADDRESS)
        self.hyperparameters = hyperparameters
        self.session: Session | None = None

    def update(self, params, grads) -> None:
        if self.session is None:
            dtype = next(iter(params.values())).dtype.name
            self.session = self.client.create_session(
                self.optimizer, params, master_dtype=dtype if dtype in ("float32", "float64") else None,
                **self.hyperparameters)
        self.session.arrays = params
        self.session.step({k: grads[k] for k in params})

    def close(self) -> None:
        """Delete the session (and close the connection this object opened)."""
        if self.session is not None:
            self.session.delete()
            self.session = None
        if self._own_client:
            self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SGD(_ServiceOptimizer):
    optimizer = "sgd"

    def __init__(self, lr=0.01, **kw):
        super().__init__(lr=lr, **kw)


class Momentum(_ServiceOptimizer):
    optimizer = "momentum"

    def __init__(self, lr=0.01, momentum=0.9, **kw):
        super().__init__(lr=lr, momentum=momentum, **kw)


class Nesterov(_ServiceOptimizer):
    optimizer = "nesterov"

    def __init__(self, lr=0.01, momentum=0.9, **kw):
        super().__init__(lr=lr, momentum=momentum, **kw)


class AdaGrad(_ServiceOptimizer):
    optimizer = "adagrad"

    def __init__(self, lr=0.01, **kw):
        super().__init__(lr=lr, **kw)


class RMSprop(_ServiceOptimizer):
    optimizer = "rmsprop"

    def __init__(self, lr=0.01, decay_rate=0.99, **kw):
        super().__init__(lr=lr, decay_rate=decay_rate, **kw)


class Adam(_ServiceOptimizer):
    optimizer = "adam"

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, **kw):
        super().__init__(lr=lr, beta1=beta1, beta2=beta2, **kw)
