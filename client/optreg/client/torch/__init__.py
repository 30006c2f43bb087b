"""optreg for torch: `RemoteOptimizer`, a torch.optim.Optimizer whose master parameters and state
live in optreg sessions (optimizer.py; its docstring says how it behaves), and how each torch.optim
class maps onto an optreg optimizer (options.py).

    from optreg.client.torch import RemoteOptimizer
    opt = RemoteOptimizer(model.parameters(), "torch.adam", address="127.0.0.1:50051", lr=1e-3)
"""
from optreg.client.torch.optimizer import RemoteOptimizer

__all__ = ["RemoteOptimizer"]
