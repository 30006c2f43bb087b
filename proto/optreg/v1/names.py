"""The contract's enums as the names people write (`"every-step"`, `"delta"`, `"float32"`...): one table
each, read by the server, the Python client and the CLI alike. Each maps name -> enum value; `name_of`
reads one back. An enum's UNSPECIFIED value is not a name: callers say what it means where they use it."""
from __future__ import annotations

from optreg.v1 import registry_pb2, session_pb2, tensor_pb2

STEP_REPLY = {"parameters": session_pb2.STEP_REPLY_PARAMETERS, "delta": session_pb2.STEP_REPLY_DELTA,
              "none": session_pb2.STEP_REPLY_NONE, "bf16_delta": session_pb2.STEP_REPLY_BF16_DELTA}
DURABILITY = {"every-step": session_pb2.DURABILITY_EVERY_STEP, "log": session_pb2.DURABILITY_LOG,
              "periodic": session_pb2.DURABILITY_PERIODIC, "none": session_pb2.DURABILITY_NONE}
MASTER_DTYPE = {"float32": tensor_pb2.DATA_TYPE_FLOAT32, "float64": tensor_pb2.DATA_TYPE_FLOAT64}
WORKER_MODE = {"sync": session_pb2.WORKER_MODE_SYNC, "async": session_pb2.WORKER_MODE_ASYNC,
               "ssp": session_pb2.WORKER_MODE_SSP}
COMBINE = {"mean": session_pb2.COMBINE_MEAN, "sum": session_pb2.COMBINE_SUM}
HYPERPARAMETER_TYPE = {"float": registry_pb2.HYPERPARAMETER_TYPE_FLOAT, "int": registry_pb2.HYPERPARAMETER_TYPE_INT,
                       "bool": registry_pb2.HYPERPARAMETER_TYPE_BOOL}

_BACK = {id(t): {v: k for k, v in t.items()} for t in (STEP_REPLY, DURABILITY, MASTER_DTYPE, WORKER_MODE, COMBINE,
                                                     HYPERPARAMETER_TYPE)}


def name_of(table: dict, value: int, unspecified: str | None = None) -> str | None:
    """The name of enum `value` in `table`; `unspecified` for the enum's 0 (UNSPECIFIED); None if unknown."""
    if value == 0 and unspecified is not None:
        return unspecified
    return _BACK[id(table)].get(value)
