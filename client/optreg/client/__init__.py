"""optreg's Python client."""
from optreg.client.book import SGD, AdaGrad, Adam, Momentum, Nesterov, RMSprop
from optreg.client.client import Client, Session
from optreg.client.errors import (AlreadyExists, DeadlineExceeded, Internal, InvalidArgument, NotFound,
                                  OptregError, PermissionDenied, ResourceExhausted, StepMismatch, Unauthenticated,
                                  Unavailable)

__all__ = ["SGD", "AdaGrad", "Adam", "AlreadyExists", "Client", "DeadlineExceeded", "Internal", "InvalidArgument",
           "Momentum", "Nesterov", "NotFound", "OptregError", "PermissionDenied", "RMSprop", "ResourceExhausted",
           "Session", "StepMismatch", "Unauthenticated", "Unavailable"]
