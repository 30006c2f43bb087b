"""optreg's Python client.

    from optreg.client import Client
    with Client() as client:                               # $OPTREG_ADDRESS, else 127.0.0.1:50051
        session = client.create_session("adam", params, lr=0.001)
        session.step(grads)                                # params now hold the updated values

Modules:

    client            Client: the connection; opens, finds and deletes sessions
    session           Session: one training run's optimizer, stepping the caller's arrays
    workers           Worker: a member of a shared session, from `client.join` (docs/workers.md)
    _step_transport   how a step travels (unary, stream or shared memory) and which one, when
    transport         the RPCs over gRPC (tests replace it with a fake)
    sparse_rows       a sparse step's rows, out and back
    results           what calls return: SessionInfo, OptimizerInfo, StepResult, SessionState...
    checks            arguments and resume matching, before any call
    retry             RetryPolicy
    errors            the exceptions (below)
    book              the book's drop-in optimizer classes
    torch             RemoteOptimizer, a torch.optim.Optimizer on optreg sessions

Every error is an OptregError; its base class says what happened:

    OptregError                      .code: the grpc.StatusCode (None for the client's own)
    ├── TransportError               no answer from the server; a step may or may not be applied
    │   ├── Unavailable              unreachable for the whole retry window (RetryPolicy, 5 s)
    │   ├── DeadlineExceeded         no answer within the call's timeout
    │   └── Cancelled                the call was cancelled (this process, a server shutting down)
    ├── Refusal                      the server answered with an error status and changed nothing
    │   ├── InvalidArgument          (also a ValueError) a bad field; the message names it
    │   ├── NotFound                 (also a LookupError) no such session or optimizer
    │   ├── AlreadyExists            that session id is taken (resume=True attaches instead)
    │   ├── FailedPrecondition       durability without a data dir, shared memory from afar, ...
    │   │   ├── StepMismatch         the session is at another step: .server_step
    │   │   └── WriterConflict       another process is stepping the session: .holder
    │   ├── PermissionDenied         the session belongs to another token
    │   ├── Unauthenticated          no token, or an unknown one
    │   ├── ResourceExhausted        over the server's memory budget, or its disk is full
    │   ├── DataLoss                 the server could not read the session's file
    │   ├── Internal                 an optimizer plugin raised; the session is as before the step
    │   ├── Unimplemented            an older server without this method
    │   └── Unknown                  an unexpected failure in the server (see its log)
    ├── ReassemblyError              a streamed reply's chunks did not fit (the client's finding,
    │                                not the server's DATA_LOSS)
    └── UsageError                   (also a ValueError) refused before anything was sent

Retries: a call that fails with UNAVAILABLE is retried with backoff for at most
RetryPolicy.total_seconds (5 s by default), then raises Unavailable. A step is retried with
the same step number, so the server applies it exactly once. DEADLINE_EXCEEDED and refusals
are never retried. `Client(wait_for_ready=True)` waits for a server that is not up yet.
"""
from optreg.client import errors
from optreg.client.book import SGD, AdaGrad, Adam, Momentum, Nesterov, RMSprop
from optreg.client.client import Client
from optreg.client.errors import (AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, Internal,
                                  InvalidArgument, NotFound, OptregError, PermissionDenied, ReassemblyError, Refusal,
                                  ResourceExhausted, StepMismatch, TransportError, Unauthenticated, Unavailable,
                                  Unimplemented, Unknown, UsageError, WriterConflict)
from optreg.client.results import (Hyperparameter, OptimizerInfo, PluginFailure, SessionInfo, SessionState, Slot,
                                   StepResult)
from optreg.client.retry import RetryPolicy
from optreg.client.session import Session
from optreg.client.transport import GrpcTransport, Transport
from optreg.client.workers import Worker, WorkerStepResult
from optreg.client.results import MemberInfo, RoundSummary, ScheduleInfo, WorkerSetup

__all__ = ["SGD", "AdaGrad", "Adam", "AlreadyExists", "Cancelled", "Client", "DataLoss", "DeadlineExceeded",
           "FailedPrecondition", "GrpcTransport", "Hyperparameter", "Internal", "InvalidArgument", "Momentum",
           "Nesterov", "NotFound", "OptimizerInfo", "OptregError", "PermissionDenied", "PluginFailure", "RMSprop",
           "ReassemblyError", "Refusal", "ResourceExhausted", "RetryPolicy", "Session", "SessionInfo",
           "SessionState", "Slot", "StepMismatch", "StepResult", "Transport", "TransportError", "Unauthenticated",
           "Unavailable", "Unimplemented", "Unknown", "UsageError", "errors", "Worker", "WorkerStepResult",
           "MemberInfo", "RoundSummary", "ScheduleInfo", "WorkerSetup", "WriterConflict"]
