"""The built-in learning-rate schedules: an ordinary plugin of the `optreg_schedules` hook.

Each gives factor(k) for k = the steps applied before this one (torch's `last_epoch`); step t runs
with lr = the session's lr * factor(t - 1). Each matches torch.optim.lr_scheduler (2.13) to rounding
(tests/plugins/test_schedules.py checks to 1e-12):

  constant      1                                          LambdaLR(lambda k: 1)
  linear-warmup start_factor -> 1 over warmup_steps, then 1  LinearLR(start_factor, 1, warmup_steps)
  cosine        warm-up, then 1 -> min_factor over the rest  SequentialLR([LinearLR, CosineAnnealingLR(
                of total_steps by half a cosine               T_max=total_steps - warmup_steps, eta_min)])
  linear-decay  warm-up, then 1 -> end_factor linearly       SequentialLR([LinearLR, LinearLR(1, end_factor)])
  onecycle      OneCycleLR with the session's lr as max_lr   OneCycleLR(cycle_momentum=False), lr only
  inverse-sqrt  t / warmup_steps, then sqrt(warmup_steps / t) (t = k + 1) LambdaLR of that

Past total_steps a schedule holds its last value (torch's cosine would rise again, OneCycleLR raises).
"""
import math

from optreg.plugins import Hyperparameter, hookimpl
from optreg.plugins.schedule import Schedule


def _warmup(k: int, p) -> float:
    """LinearLR(start_factor, 1, warmup_steps)'s factor during the warm-up (k < warmup_steps)."""
    s = p["start_factor"]
    return s + (1.0 - s) * k / p["warmup_steps"]


def _after_warmup(p) -> str | None:
    if p["total_steps"] <= p["warmup_steps"]:
        return f"total_steps={p['total_steps']} must be greater than warmup_steps={p['warmup_steps']}"
    return None


WARMUP = Hyperparameter("warmup_steps", 0, "steps of linear warm-up from start_factor to 1", type=int, minimum=0)
START = Hyperparameter("start_factor", 0.0, "the warm-up's first factor", minimum=0.0, maximum=1.0)
TOTAL = Hyperparameter("total_steps", 1, "the step the schedule ends at (it holds its last value after)", type=int,
                       minimum=1)


def constant(k, p):
    return 1.0


def linear_warmup(k, p):
    return _warmup(k, p) if k < p["warmup_steps"] else 1.0


def cosine(k, p):
    w, m = p["warmup_steps"], p["min_factor"]
    if k < w:
        return _warmup(k, p)
    k = min(k - w, p["total_steps"] - w)
    return m + (1.0 - m) * (1.0 + math.cos(math.pi * k / (p["total_steps"] - w))) / 2.0


def linear_decay(k, p):
    w, e = p["warmup_steps"], p["end_factor"]
    if k < w:
        return _warmup(k, p)
    n = p["total_steps"] - w
    return 1.0 + (e - 1.0) * min(k - w, n) / n


def onecycle(k, p):
    """torch's OneCycleLR (two phases, cosine annealing) as a factor of max_lr."""
    initial = 1.0 / p["div_factor"]
    final = initial / p["final_div_factor"]
    end1, end2 = float(p["pct_start"] * p["total_steps"]) - 1, float(p["total_steps"] - 1)
    k = min(k, p["total_steps"] - 1)
    if k <= end1:
        start, end, pct = initial, 1.0, k / end1
    else:
        start, end, pct = 1.0, final, (k - end1) / (end2 - end1)
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _onecycle_check(p):
    if p["pct_start"] * p["total_steps"] <= 1:
        return (f"pct_start={p['pct_start']!r} * total_steps={p['total_steps']} must be > 1 "
                "(the warm-up phase needs a step)")
    return None


def inverse_sqrt(k, p):
    t, w = k + 1, p["warmup_steps"]
    return t / w if t < w else math.sqrt(max(w, 1) / t)


SCHEDULES = [
    Schedule("constant", "lr unchanged at every step.", constant),
    Schedule("linear-warmup", "lr from start_factor * lr up to lr linearly over warmup_steps, then lr "
             "(torch LinearLR).", linear_warmup,
             (Hyperparameter("warmup_steps", 1, "steps of linear warm-up", type=int, minimum=1), START),
             required=("warmup_steps",)),
    Schedule("cosine", "Linear warm-up, then half a cosine from lr down to min_factor * lr at total_steps "
             "(torch LinearLR then CosineAnnealingLR).", cosine,
             (TOTAL, WARMUP, START, Hyperparameter("min_factor", 0.0, "the factor at total_steps (eta_min / lr)",
                                                   minimum=0.0, maximum=1.0)),
             check=_after_warmup, required=("total_steps",)),
    Schedule("linear-decay", "Linear warm-up, then lr down to end_factor * lr linearly at total_steps "
             "(torch LinearLR).", linear_decay,
             (TOTAL, WARMUP, START, Hyperparameter("end_factor", 0.0, "the factor at total_steps",
                                                   minimum=0.0, maximum=1.0)),
             check=_after_warmup, required=("total_steps",)),
    Schedule("onecycle", "torch OneCycleLR (cosine, two phases; lr only) with the session's lr as max_lr.",
             onecycle,
             (Hyperparameter("total_steps", 100, "steps in the cycle", type=int, minimum=2),
              Hyperparameter("pct_start", 0.3, "the share of the cycle spent rising", minimum=0.0, maximum=1.0,
                             minimum_exclusive=True, maximum_exclusive=True),
              Hyperparameter("div_factor", 25.0, "initial lr = lr / div_factor", minimum=0.0, minimum_exclusive=True),
              Hyperparameter("final_div_factor", 1e4, "final lr = initial lr / final_div_factor", minimum=0.0,
                             minimum_exclusive=True)),
             check=_onecycle_check, required=("total_steps",)),
    Schedule("inverse-sqrt", "t / warmup_steps * lr up to warmup_steps, then lr * sqrt(warmup_steps / t) "
             "(t: the step's number).", inverse_sqrt, (WARMUP,)),
]


@hookimpl
def optreg_schedules():
    return SCHEDULES
