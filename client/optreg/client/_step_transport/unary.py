"""The unary transport: one Step call, the gradients in one message and the reply in one.

The path of small steps (see this package's docstring for when it is chosen).
"""
from __future__ import annotations

from optreg.v1 import session_pb2, tensors


class UnaryStep:
    """One Step call: gradients and reply in one message each."""

    def send(self, session, grads, fence: int, hyperparameters, metrics, timeout):
        feedback = session.compression  # compressed gradients (compression.py): the same bytes on every attempt
        if feedback is None or not feedback.now:
            request = session_pb2.StepRequest(session_id=session.id, step=fence,
                                              gradients=[tensors.from_numpy(n, g) for n, g in grads.items()])
        else:
            msgs, feedback.pending = feedback.encode(grads)  # kept by Session.step once these are applied
            request = session_pb2.StepRequest(session_id=session.id, step=fence, compressed=msgs)
        if hyperparameters:  # empty maps cost ~6 us in the constructor; a small step takes ~600 us
            request.hyperparameters.update(hyperparameters)
        if metrics:
            request.metrics.update(metrics)
        reply = session.client.transport.unary("Step", request, timeout=timeout, **session.step_headers())
        session.lr = reply.lr
        return reply.replayed, reply.step, {t.name: tensors.to_numpy(t) for t in reply.tensors}
