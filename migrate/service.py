"""The gRPC face of the destination: thin handlers that delegate to
migrate.destination, and one interceptor that turns exceptions into status codes.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

from migrate import destination as dst
from migrate.errors import LayoutMismatch, MigrateError, ProtocolError
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.protocol import CHANNEL_OPTIONS

_CODES = [
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (dst.BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (dst.NoGuestError, grpc.StatusCode.UNAVAILABLE),
    (MigrateError, grpc.StatusCode.INTERNAL),
]


def _status(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorInterceptor(grpc.ServerInterceptor):
    """Every handler's exceptions become a status with the exception's text."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return None

        def unary(fn):
            def call(request, context):
                try:
                    return fn(request, context)
                except MigrateError as e:
                    context.abort(_status(e), str(e))
            return call

        def streaming(fn):
            def call(request, context):
                try:
                    yield from fn(request, context)
                except MigrateError as e:
                    context.abort(_status(e), str(e))
            return call

        kinds = {
            "unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
            "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
            "unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
            "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming),
        }
        for attr, (make, wrap) in kinds.items():
            fn = getattr(handler, attr)
            if fn is not None:
                return make(wrap(fn), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


def _first(request_iterator, what: str) -> pb.PageBatch:
    try:
        first = next(request_iterator)
    except StopIteration:
        raise ProtocolError(f"{what} stream closed before naming its session") from None
    if not first.session_id:
        raise ProtocolError(f"first message of a {what} stream must carry only session_id")
    return first


class MigrationService(pbg.MigrationServicer):
    def __init__(self, agent: dst.Destination):
        self.agent = agent

    def Open(self, request, context):
        return self.agent.open(request)

    def Demand(self, request_iterator, context):
        m = self.agent.migration(_first(request_iterator, "Demand").session_id)
        gen = m.source_gen

        def replies():
            why = "demand stream ended"
            try:
                for batch in request_iterator:
                    m.receive(batch, demand=True)
            except MigrateError as e:
                why = str(e)
                m.reporter.event("error", f"bad demand reply: {e}", session=m.id)
                context.cancel()
            except grpc.RpcError:
                why = "source connection lost"
            if not m.done.is_set():
                m.source_lost(gen, why)

        threading.Thread(target=replies, name=f"demand-rx-{m.id}", daemon=True).start()
        yield from m.demand_requests(gen, context.is_active)

    def Push(self, request_iterator, context):
        m = self.agent.migration(_first(request_iterator, "Push").session_id)
        gen = m.source_gen
        n = 0
        try:
            for batch in request_iterator:
                n += m.receive(batch, demand=False)
        except MigrateError as e:
            m.reporter.event("error", f"bad push batch: {e}", session=m.id)
            m.source_lost(gen, str(e))
            raise
        return pb.PushSummary(pages_placed=n)

    def Finish(self, request, context):
        m = self.agent.migration(request.session_id)
        m.done.wait(request.timeout_seconds or None)
        return m.finish_reply()

    def DeviceState(self, request_iterator, context):
        raise MigrateError("this destination was started without --qmp: it takes no device state")


def serve(agent: dst.Destination, listen: str, workers: int = 32) -> tuple[grpc.Server, str]:
    """Starts the gRPC server; returns it and the real address (port 0 resolved)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
                         interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS)
    pbg.add_MigrationServicer_to_server(MigrationService(agent), server)
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: use HOST:PORT, e.g. 127.0.0.1:0")
    bound = server.add_insecure_port(listen)
    if bound == 0:
        raise OSError(f"cannot listen on {listen}: address in use or not local")
    server.start()
    return server, f"{host}:{bound}"
