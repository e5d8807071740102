"""The gRPC face of the destination: thin handlers that delegate to
migrate.dest.agent, one interceptor that turns exceptions into status codes,
one that bounds what peers may make the server hold (RpcLimits), and with TLS
one that checks every call's peer first (PeerInterceptor).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import json
import queue
import threading
import time
import urllib.parse
from collections import Counter
from concurrent import futures
from dataclasses import dataclass

import grpc

from migrate.dest import agent as dst
from migrate.dest.channels import taking_pages
from migrate.dest.state import NotAuthorised, Peer
from migrate.errors import LayoutMismatch, MigrateError, ProtocolError
from migrate.proto import migration_pb2 as pb
from migrate.proto import migration_pb2_grpc as pbg
from migrate.qemu import resume_hint
from migrate.report import Reporter
from migrate.wire.protocol import SERVER_OPTIONS
from migrate.wire.tcp import Address, parse_address
from migrate.wire.tls import TlsConfig

_CODES = [
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (ProtocolError, grpc.StatusCode.INVALID_ARGUMENT),
    (dst.BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (dst.NoGuestError, grpc.StatusCode.UNAVAILABLE),
    (NotAuthorised, grpc.StatusCode.PERMISSION_DENIED),
    (MigrateError, grpc.StatusCode.INTERNAL),
]


def _status(exc: BaseException) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


def _rewrap(handler: grpc.RpcMethodHandler, unary, streaming) -> grpc.RpcMethodHandler:
    """handler with its behaviour wrapped, whatever kind of call it serves:
    unary(fn) wraps one that answers with one message, streaming(fn) one
    that answers with a stream."""
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


def _guarded(handler: grpc.RpcMethodHandler, guard) -> grpc.RpcMethodHandler:
    """handler with each of its calls run inside guard(context), a context
    manager (a check before the call, a rule for its errors), whatever kind
    of call it serves."""
    def unary(fn):
        def call(request, context):
            with guard(context):
                return fn(request, context)
        return call

    def streaming(fn):
        def call(request, context):
            with guard(context):
                yield from fn(request, context)
        return call

    return _rewrap(handler, unary, streaming)


class ErrorInterceptor(grpc.ServerInterceptor):
    """Every handler's exceptions become a status with the exception's text."""

    @staticmethod
    @contextlib.contextmanager
    def _as_status(context):
        try:
            yield
        except MigrateError as e:
            context.abort(_status(e), str(e))

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        return None if handler is None else _guarded(handler, self._as_status)


@dataclass(frozen=True)
class RpcLimits:
    """What the gRPC server lets its peers hold (STYLE.md, "Trust at the
    boundary"). Each call takes a slot of its kind when it starts, before its
    first message, and gives it back when it ends: streams (Push, DeviceState)
    and calls (Open, Finish) have slots of their own, so idle streams never
    keep a source from opening or finishing its session, and one host cannot
    take every slot of a kind. A call finding none free ends at once with
    RESOURCE_EXHAUSTED saying why; none waits in a queue."""
    streams: int = 32          # Push and DeviceState streams at once, every host
    calls: int = 16            # Open and Finish at once (Open waits up to 30 s for a guest, Finish for the end)
    host_streams: int = 16     # one host's streams: a source opens at most 5 (4 push streams, the device state)
    host_calls: int = 8        # one host's calls: a source makes at most 2 at once
    first_message: float = 10.0   # s from a call's start to its first message: a source sends it at once
    idle: float = 120.0        # s between two messages of a stream (a push paced by --max-rate is this slow
    #                            only below batch x streams / 120 s, about 35 KB/s with the defaults)
    connections: int = 128     # TCP connections at once (every source opens 1 + its push streams)
    handshake: float = 10.0    # s for a new connection to finish its HTTP/2 (and TLS) handshake

    @property
    def workers(self) -> int:
        # every slot has its thread, and a few more answer the calls refused
        # for want of a slot; gRPC refuses what comes beyond even that
        # (maximum_concurrent_rpcs) rather than queueing it
        return self.streams + self.calls + 8

    def options(self) -> list[tuple[str, int]]:
        return [("grpc.max_allowed_incoming_connections", self.connections),
                ("grpc.server_handshake_timeout_ms", int(self.handshake * 1000)),
                # streams of one connection: a source's channels carry a few each
                ("grpc.max_concurrent_streams", self.host_streams + self.host_calls)]


WORKER_IDLE = 5.0   # s a gRPC worker thread waits for another call before it ends


class ShrinkingExecutor(futures.Executor):
    """The gRPC server's threads: up to max_workers, started as calls come,
    each ending once it has waited `idle` s with no call to run.
    futures.ThreadPoolExecutor never gives a thread back, so a long-lived
    agent kept, for good, a thread for every call it ever ran at once (a
    round of migrations at once left one behind each). The server refuses
    calls beyond max_workers (maximum_concurrent_rpcs), so the queue here
    stays that short."""

    def __init__(self, max_workers: int, idle: float = WORKER_IDLE, name: str = "grpc"):
        self.max_workers = max_workers
        self.idle = idle
        self.name = name
        self._cond = threading.Condition()
        self._work: collections.deque = collections.deque()
        self._threads: set[threading.Thread] = set()
        self._waiting = 0        # threads waiting for work
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> futures.Future:
        f = futures.Future()
        with self._cond:
            if self._shutdown:
                raise RuntimeError("cannot schedule new calls after shutdown")
            self._work.append((f, fn, args, kwargs))
            if len(self._work) > self._waiting and len(self._threads) < self.max_workers:
                t = threading.Thread(target=self._worker, name=f"{self.name}-{len(self._threads)}", daemon=True)
                self._threads.add(t)
                t.start()
            else:
                self._cond.notify()
        return f

    def _worker(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                self._waiting += 1
                deadline = time.monotonic() + self.idle
                while not self._work and not self._shutdown:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                self._waiting -= 1
                if not self._work:
                    self._threads.discard(me)
                    return
                f, fn, args, kwargs = self._work.popleft()
            if f.set_running_or_notify_cancel():
                try:
                    f.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - handed to the future, as ThreadPoolExecutor does
                    f.set_exception(e)
            del f, fn, args, kwargs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._cond:
            self._shutdown = True
            if cancel_futures:
                while self._work:
                    self._work.popleft()[0].cancel()
            threads = list(self._threads)
            self._cond.notify_all()
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()


class StreamIdle(Exception):
    """A call's next message did not come within its deadline. (Not a
    MigrateError: the handlers' rules for bad input and failed placement do
    not apply to silence; Bounds ends the call with DEADLINE_EXCEEDED.)"""


class DeadlinedRequests:
    """A call's requests, each of which has to come within a deadline: the
    first within `first` s of the call's start, each next within `idle` s of
    the one before. gRPC's own iterator blocks for as long as the peer sends
    nothing, so it is read on a thread of its own (one per call, ending with
    the call) while the handler waits here with a timeout. One message is
    asked for at a time: nothing is read ahead of the handler, and HTTP/2
    flow control still holds the peer back."""

    def __init__(self, requests, method: str, first: float, idle: float):
        self._requests = requests
        self.method = method
        self._wait, self._idle = first, idle
        self._asked = threading.Semaphore(0)
        self._got: queue.SimpleQueue = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._end: BaseException | None = None   # StopIteration, or what ended the requests
        self._count = 0
        self._closed = False

    def __iter__(self):
        return self

    def __next__(self):
        if self._end is not None:
            raise self._end
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name=f"grpc-read-{self.method}", daemon=True)
            self._reader.start()
        self._asked.release()
        try:
            ok, value = self._got.get(timeout=self._wait)
        except queue.Empty:
            self._end = StreamIdle(
                f"nothing came on this {self.method} stream for {self._wait:g} s: dropped" if self._count else
                f"no {self.method} request within {self._wait:g} s of the call's start: dropped (a source sends "
                "it at once)")
            raise self._end from None
        if not ok:
            self._end = value
            raise value
        self._count += 1
        self._wait = self._idle
        return value

    def _read(self) -> None:
        # ends when the requests do, or the call: a call ended under a
        # waiting read (a deadline passed) ends that read too
        while True:
            self._asked.acquire()
            if self._closed:
                return
            try:
                self._got.put((True, next(self._requests)))
            except StopIteration:
                self._got.put((False, StopIteration()))
                return
            except Exception as e:   # noqa: BLE001 - the handler's to raise (grpc.RpcError: the call ended)
                self._got.put((False, e))
                return

    def close(self) -> None:
        """The call has ended: lets the reader go if it waits to be asked."""
        self._closed = True
        self._asked.release()


def peer_host(peer: str) -> str:
    """The host of a gRPC peer string ("ipv4:10.0.0.2:5000", "ipv6:%5B::1%5D:5000")."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    host = urllib.parse.unquote(rest).rpartition(":")[0].strip("[]")
    return host.removeprefix("::ffff:") if "." in host else host   # an IPv4 peer of a dual-stack port


class Bounds(grpc.ServerInterceptor):
    """Bounds every call by RpcLimits: a slot of its kind, taken as the call
    starts and given back as it ends, and deadlines on its messages. Every
    call is served as a request stream (the wire is the same for one message
    and many): that way a unary call also starts in a handler, whose first
    message can have a deadline, instead of holding a server thread inside
    gRPC until its message comes."""

    _KINDS = {True: ("stream", "Push and DeviceState streams"), False: ("call", "Open and Finish calls")}

    def __init__(self, limits: RpcLimits):
        self.limits = limits
        self.lock = threading.Lock()
        self.held: Counter = Counter()   # (kind, host) -> calls holding a slot; (kind, None): every host's

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or handler.response_streaming:
            return handler   # (the service answers every call with one message)
        stream = handler.request_streaming
        inner = handler.stream_unary if stream else handler.unary_unary
        method = details.method.rpartition("/")[2]
        lim = self.limits

        def call(requests, context):
            host = peer_host(context.peer())
            refused = self._take(stream, host)
            if refused:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            reqs = DeadlinedRequests(requests, method, lim.first_message, lim.idle)
            try:
                if stream:
                    return inner(reqs, context)
                try:
                    request = next(reqs)
                except StopIteration:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{method} call ended without its request")
                return inner(request, context)
            except StreamIdle as e:
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(e))
            finally:
                reqs.close()
                self._give(stream, host)

        return grpc.stream_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    def _take(self, stream: bool, host: str) -> str | None:
        """Takes a slot for a call from host; or says why there is none."""
        kind, what = self._KINDS[stream]
        lim = self.limits
        per_host, total = (lim.host_streams, lim.streams) if stream else (lim.host_calls, lim.calls)
        with self.lock:
            if self.held[kind, host] >= per_host:
                return (f"refused: {host} has {per_host} {what} under way here already, the most one host may "
                        "hold (a source needs at most 5 streams and 2 calls): end the idle ones")
            if self.held[kind, None] >= total:
                return (f"refused: this destination serves {total} {what} already, the most it takes at once: "
                        "try again when one has ended")
            self.held[kind, host] += 1
            self.held[kind, None] += 1
        return None

    def _give(self, stream: bool, host: str) -> None:
        kind = self._KINDS[stream][0]
        with self.lock:
            self.held[kind, None] -= 1
            self.held[kind, host] -= 1
            if not self.held[kind, host]:
                del self.held[kind, host]


# -- who is calling ------------------------------------------------------------
def cert_names(auth: dict) -> list[str]:
    """The names a peer's certificate carries, from gRPC's auth context: its
    DNS SANs, else (a certificate without SANs) its CN."""
    dns = [n.decode() for n in auth.get("peer_dns", ())]
    if dns or auth.get("x509_subject_alternative_name"):
        return dns
    return [n.decode() for n in auth.get("x509_common_name", ())]


def peer_identity(context) -> str | None:
    """Who is calling, as a session is bound to it: the first name its
    certificate carries (DNS SAN, else CN; its subject when it has neither).
    None on a plaintext channel (loopback or --insecure), where nobody is
    authenticated. With TLS every call reaching a handler has passed
    PeerInterceptor: the CA signed the certificate and --allow-source takes it."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names = cert_names(auth)
    if names:
        return names[0]
    subject = auth.get("x509_subject")
    return subject[0].decode() if subject else None


def check_peer(auth: dict, tls: TlsConfig) -> tuple[grpc.StatusCode, str] | None:
    """Why a call with this auth context is refused (its status and message),
    or None when it is taken. The message says nothing about the guests here:
    the caller is not known to be a source of theirs."""
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_pem_cert"):
        return grpc.StatusCode.UNAUTHENTICATED, "this destination takes only TLS with a client certificate"
    version = b"".join(auth.get("ssl_tls_version", ())).decode() or "unknown"
    if version != "TLSv1.3":
        return grpc.StatusCode.UNAUTHENTICATED, f"this destination takes TLS 1.3 only, not {version}"
    names = cert_names(auth)
    if not tls.allows(names):
        shown = ", ".join(names) if names else "no DNS name or CN"
        return (grpc.StatusCode.PERMISSION_DENIED,
                f"a source whose certificate names {shown} is not allowed here (the destination names the sources "
                "it takes with --allow-source)")
    return None


class PeerInterceptor(grpc.ServerInterceptor):
    """With TLS, every call's peer is checked (check_peer) before its handler
    runs, and refused with the status and message it gives; each refusal is
    a `refused` event at the destination."""

    def __init__(self, tls: TlsConfig, reporter: Reporter):
        self.tls = tls
        self.reporter = reporter

    def _refuse(self, context) -> None:
        why = check_peer(context.auth_context(), self.tls)
        if why is not None:
            code, message = why
            self.reporter.event("refused", f"a gRPC call from {context.peer()}: {message}", peer=context.peer(),
                                code=code.name)
            context.abort(code, message)

    @contextlib.contextmanager
    def _checked(self, context):
        self._refuse(context)
        yield

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        return None if handler is None else _guarded(handler, self._checked)



def _on_loopback(peer: str) -> bool:
    """Whether a gRPC peer address ("ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000":
    grpc percent-encodes the brackets) is this host's loopback."""
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return False
    try:
        addr = ipaddress.ip_address(rest.rpartition(":")[0].strip("[]"))
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def _peer(context) -> Peer:
    """Who makes this call (migrate.dest.state.Peer): a peer with a verified
    certificate, or a plaintext one on loopback, is authenticated."""
    identity = peer_identity(context)
    return Peer(identity, identity is not None or _on_loopback(context.peer()))


# --- session token and identity ------------------------------------------------
# Push, DeviceState and Finish act on a session: each carries the token its
# source's Open got (the first message of a stream; every Finish) and comes from
# the peer that opened the session; migrate.dest.state compares both, and
# refuses with a message that names nothing of the guest.

def _first(request_iterator, what: str) -> pb.PageBatch:
    try:
        first = next(request_iterator)
    except StopIteration:
        raise ProtocolError(f"{what} stream closed before naming its session") from None
    if not first.session_id:
        raise ProtocolError(f"first message of a {what} stream must carry only session_id and token")
    return first


class MigrationService(pbg.MigrationServicer):
    def __init__(self, agent: dst.Destination, device_state=None):
        self.agent = agent
        self.device_state = device_state   # migrate.qemu.dest.DeviceStateFeeder with --qmp

    def Open(self, request, context):
        if request.has_device_state and self.device_state is None:
            raise ProtocolError("the source sends QEMU device state but this destination was started "
                                "without --qmp: start `migrate dest` with --qmp SOCKET of the destination QEMU")
        if request.has_device_state:
            # the source stops its QEMU once this answers: the destination QEMU
            # must wait in migrate-incoming by then
            self.device_state.ready()
        if self.device_state is not None and not request.has_device_state:
            # a source resuming a session whose device state is here already
            # (its first source was lost after sending it) serves only the rest
            # of its RAM, also while the destination QEMU is still loading it
            if request.resume_guest:
                # A source recovering a session it lost names its guest only
                # once the destination said that guest runs (the device state
                # loaded): on this agent, or on one it re-attached to since.
                why = self.device_state.why_not_resumable(request.resume_session) \
                    if request.resume_session in self.device_state.feeds else None
                if why:
                    raise ProtocolError(f"cannot recover session {request.resume_session} without device state: "
                                        f"{why}")
                welcome = self.agent.open(request, _peer(context))
                self.device_state.loaded_before(welcome.session_id)
                return welcome
            if not request.resume_session:
                raise ProtocolError("this destination feeds a QEMU (--qmp) but the source sends no device state: "
                                    "start `migrate source` with --qmp SOCKET of the source QEMU (or, to serve "
                                    "the rest of a session whose device state is here already, with --resume "
                                    "SESSION)")
            why = self.device_state.why_not_resumable(request.resume_session)
            if why:
                raise ProtocolError(f"cannot resume session {request.resume_session} without device state: {why}. "
                                    "The guest does not run here: the paused source QEMU still is the VM (resume "
                                    f"it with {resume_hint()}), or migrate it "
                                    "again with `migrate source --qmp`")
        return self.agent.open(request, _peer(context))

    def Push(self, request_iterator, context):
        first = _first(request_iterator, "Push")
        m = self.agent.migration(first.session_id)
        gen = m.admit(first.token, _peer(context), "Push")
        n = 0
        try:
            with taking_pages(m, gen, bad="bad push batch", placing="placing pushed pages", reraise=True):
                for batch in request_iterator:
                    if not m.machine.serves(gen):
                        # dropped (its token revoked) or replaced meanwhile:
                        # its stream places nothing more
                        why = m.machine.why if m.machine.source_gen == gen else "another source took over"
                        context.abort(grpc.StatusCode.ABORTED, f"the destination dropped this source: {why}")
                    n += m.receive(batch)
                    if m.error:
                        # failed here (the guest went away, the kernel refused a
                        # page): end the stream with the reason, so that its
                        # source asks Finish now rather than when the server goes
                        context.abort(grpc.StatusCode.ABORTED, f"the migration failed at the destination: {m.error}")
        except grpc.RpcError:
            pass
        # The requests end when the source closes its stream, and also when
        # its connection breaks under the handler (the source went away, or
        # stopped answering the server's keepalive pings): then, mostly, the
        # RPC is no longer active. Either way the handler returns and gives
        # back its server thread.
        broken = not context.is_active()
        m.reporter.event("push_end", f"a gRPC push stream ended{' (broken)' if broken else ''} after "
                         f"placing {n} pages", session=m.id, pages=n, broken=broken)
        if broken:   # (nothing to lose once the last page is being mapped, or the migration ended)
            m.source_lost(gen, f"a gRPC push stream broke: the source closed it, or its host answered nothing "
                               f"for --source-timeout {m.source_timeout:g} s")
        return pb.PushSummary(pages_placed=n)

    def Precopy(self, request_iterator, context):
        """Pre-copy pages (Hello.precopy): into the page cache only, until the
        switch (migrate.dest.precopy)."""
        first = _first(request_iterator, "Precopy")
        m = self.agent.migration(first.session_id)
        gen = m.admit(first.token, _peer(context), "Precopy")
        n = 0
        try:
            with taking_pages(m, gen, bad="bad pre-copy batch", placing="writing pre-copy pages", reraise=True):
                m.precopy_streaming()
                for batch in request_iterator:
                    if not m.machine.serves(gen):
                        context.abort(grpc.StatusCode.ABORTED, f"the destination dropped this source: {m.machine.why}")
                    n += m.precopy_receive(batch)
                    if m.error:
                        context.abort(grpc.StatusCode.ABORTED, f"the migration failed at the destination: {m.error}")
        except grpc.RpcError:
            pass
        if not context.is_active():
            m.source_lost(gen, "a pre-copy stream broke: the source closed it, or its host answered nothing")
        else:
            # a source ends its stream right before its Switch, and one that
            # never sends it is not serving this guest
            m.channels.watch_demand_deadline(gen, "the end of pre-copy")
        return pb.PushSummary(pages_placed=n)

    def Switch(self, request, context):
        """The end of pre-copy: the final written list (bounded and checked)."""
        m = self.agent.migration(request.session_id)
        gen = m.admit(request.token, _peer(context), "Switch")
        with taking_pages(m, gen, bad="bad switch", placing="mapping pre-copied pages", reraise=True):
            return m.switch(gen, request.written)

    def Finish(self, request, context):
        return self.agent.finish(request.session_id, request.token, _peer(context), request.timeout_seconds or None)

    def Status(self, request, context):
        peer = _peer(context)
        if not peer.authenticated:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "Status refused: it is told over mutual TLS, or in "
                          "plaintext to this host's loopback only (or ask `migrate status --attach` on the host)")
        return pb.StatusReply(json=json.dumps(self.agent.status_for(peer.identity)))

    def DeviceState(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or not first.session_id:
            raise ProtocolError("first DeviceState chunk must name the session")
        m = self.agent.migration(first.session_id)
        m.admit(first.token, _peer(context), "DeviceState")   # before anything else is said
        if self.device_state is None:
            raise MigrateError("this destination was started without --qmp: it takes no device state")
        ack = self.device_state.feed(m, _chain(first, request_iterator))
        if not ack.guest_running and ack.error and not context.is_active():
            # Nobody takes this ack: the source that sent the state is gone (a
            # source resuming the session may serve RAM meanwhile). The guest
            # will not run here, so the migration has failed, and whoever
            # serves it now hears why.
            m.fail(f"the destination QEMU did not load the device state of session {m.id} ({ack.error}): "
                   "the guest does not run here; the paused source QEMU still is the VM: resume it with "
                   f"{resume_hint()}")
        return ack


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """The server pings each source's connection while it is quiet and closes
    one whose pings go unanswered for about `seconds`: a source whose host
    died or whose network split then ends its gRPC streams (a Push handler
    would otherwise hold one of the server's threads for ever). seconds <= 0:
    gRPC's defaults (no pings)."""
    if seconds <= 0:
        return []
    half = max(1000, int(seconds * 500))
    # the server sends no DATA on a push stream (it only reads), so pings must
    # not wait for data in between (min_sent_ping_interval: 5 minutes by default)
    return [("grpc.keepalive_time_ms", half), ("grpc.keepalive_timeout_ms", half),
            ("grpc.http2.max_pings_without_data", 0), ("grpc.http2.min_sent_ping_interval_without_data_ms", half)]


def _chain(first, rest):
    yield first
    yield from rest


def serve(agent: dst.Destination, listen: str, device_state=None, tls: TlsConfig | None = None,
          limits: RpcLimits = RpcLimits()) -> tuple[grpc.Server, str]:
    """Starts the gRPC server; returns it and the real address (port 0 resolved).
    tls: mutual TLS, every call's peer checked first (PeerInterceptor); None:
    plaintext (loopback or --insecure, decided by the caller)."""
    # Bounds first (a call takes its slot, and its first message has a
    # deadline), then the peer check before anything else runs for the call
    peers = [PeerInterceptor(tls, agent.reporter)] if tls is not None else []
    server = grpc.server(ShrinkingExecutor(limits.workers),
                         interceptors=[Bounds(limits), *peers, ErrorInterceptor()],
                         # no SO_REUSEPORT (gRPC's default): a second agent on the same port
                         # would share its connections, and a source could reach the wrong guest
                         options=SERVER_OPTIONS + keepalive_options(agent.source_timeout)
                         + [("grpc.so_reuseport", 0)] + limits.options(),
                         maximum_concurrent_rpcs=limits.workers)
    pbg.add_MigrationServicer_to_server(MigrationService(agent, device_state), server)
    host = parse_address(listen, "--listen", "e.g. 127.0.0.1:0").host
    try:
        bound = (server.add_secure_port(listen, tls.server_credentials()) if tls is not None
                 else server.add_insecure_port(listen))
    except RuntimeError:   # newer grpcio raises where older ones returned 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {listen}: the port is in use (another agent?) or the address is not "
                      "this host's")
    server.start()
    return server, str(Address(host, bound))
