"""Interceptors' one way of putting their behavior in front of a handler's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


def rewrap(handler: grpc.RpcMethodHandler[Any, Any],
           behavior: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of ``handler``'s shape (unary or streaming requests and responses) and
    (de)serializers whose behavior is ``behavior``: a function of that shape, usually one
    that calls ``handler``'s own in the end."""
    shape: dict[str, Any] = dict(request_deserializer=handler.request_deserializer,
                                 response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(behavior, **shape)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(behavior, **shape)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(behavior, **shape)
    return grpc.stream_stream_rpc_method_handler(behavior, **shape)
