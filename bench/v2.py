"""Contract v2 optimizers (issue 24), same run:

    python -m bench --only v2

- state bytes, as the server counts them in its memory budget before allocating (Session.set_bytes(),
  the parameters' bytes taken off) for one [8192, 8192] float32 weight: torch.adafactor's row and column
  vectors against adamw's m, v and max_v (target: at most 1%), and adamw-bf16's bfloat16 m, v and max_v
  against adamw's (target: at most 0.55x), and examples/optreg-8bit's adamw-8bit (uint8 m and v, a float32
  scale per 256 elements) against adamw's (target: at most 0.3x). No allocation: the figure is the layout's.
- a torch.muon step on a [2048, 2048] float32 weight, in process as the server runs it (kernels.apply:
  the plugin's whole-tensor update, Newton-Schulz in torch's bfloat16 kernels when torch is installed)
  against torch.optim.Muon's step on the same threads (target: at most 1.3x); medians, interleaved;
  and the same step sent by a client to the bench's server (upload, update, reply).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np

from bench.run import interleaved, row


def _state_bytes(name: str, shape: tuple) -> int:
    from optreg.plugins.registry import Registered, Registry
    from optreg.server.model.session import Durability, Session
    from optreg.v1 import tensor_pb2

    if name == "adamw-8bit":  # the example package, installed or not
        sys.path.append(str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "optreg-8bit"))
        from optreg_8bit import ADAMW_8BIT
        reg = Registered(ADAMW_8BIT, "adamw8bit", "optreg-8bit", "0.1.0")
    else:
        reg = Registry(autoload=False).get(name)
    defn = reg.definition
    s = Session("bench", reg, defn.resolve({}), tensor_pb2.DATA_TYPE_FLOAT32, "none", Durability(), {"W": shape},
                tuple(x.name for x in defn.slots))
    return s.set_bytes() - int(np.prod(shape)) * 4


def bench_v2(cfg, server, echo):
    shape = (8192, 8192)
    adam = _state_bytes("adamw", shape)
    row("state bytes, torch.adafactor [8192, 8192] f32", _state_bytes("torch.adafactor", shape), "B", "adamw",
        adam, target=0.01, note="row and column vectors: (8192 + 8192) x 4 B")
    row("state bytes, adamw-bf16 [8192, 8192] f32", _state_bytes("adamw-bf16", shape), "B", "adamw", adam,
        target=0.55, note="m, v, max_v in bfloat16")
    row("state bytes, adamw-8bit [8192, 8192] f32", _state_bytes("adamw-8bit", shape), "B", "adamw", adam,
        target=0.3, note="uint8 m, v + f32 scale per 256; 0.25x of m and v alone")
    _muon(cfg, server)


def _muon(cfg, server):
    import torch

    from optreg.plugins.registry import Registry
    from optreg.server.kernels import apply as kernels

    defn = Registry(autoload=False).get("torch.muon").definition
    hp = defn.resolve({})
    n = 2048
    rng = np.random.default_rng(0)
    p = rng.standard_normal((n, n), dtype=np.float32) * 0.02
    g = rng.standard_normal((n, n), dtype=np.float32)
    state = {"momentum_buffer": np.zeros_like(p)}
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    tp.grad = torch.from_numpy(g.copy())
    local = torch.optim.Muon([tp])
    step = [0]

    def server_side():
        step[0] += 1
        kernels.apply(defn, p, g, state, step[0], hp)

    from optreg.client import Client

    reps = 2 if cfg.quick else 5
    with Client(server.address) as c:
        session = c.create_session("torch.muon", {"w": p.copy()}, keep=False)
        served = lambda: session.step({"w": g})  # noqa: E731 - the full step: upload, update, reply
        server_side()
        served()
        local.step()  # warm-up, not counted
        times = interleaved({"optreg": server_side, "served": served, "torch": local.step}, reps)
    ours, theirs = times["optreg"], times["torch"]
    row("torch.muon step [2048, 2048] f32 (compute)", ours, "s", "torch.optim.Muon", theirs, target=1.3,
        note=f"same process, torch threads {torch.get_num_threads()}; median of {reps}")
    row("torch.muon step [2048, 2048] f32 through the server", times["served"], "s", "torch.optim.Muon", theirs,
        target=1.3, note="a client's step on the bench's default server: 16 MB up, 16 MB down, the update")
