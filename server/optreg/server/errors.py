"""A request the server refuses: a gRPC status code and a message a person can act on."""
import grpc


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, metadata: tuple = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata = metadata


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message)
