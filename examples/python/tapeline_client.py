"""A small tapeline client for Python, over stubs generated from proto/tapeline/v1/tapeline.proto.

It follows CLIENTS.md, the contract every tapeline client keeps:

- ``Subscriber`` yields the records of an interval, replayed then live, and survives anything the
  network or the broker does: it remembers the last tick of each stream and ``complete_to``,
  resumes exactly after them (nothing twice, nothing missing), treats a silence longer than three
  heartbeats as a dead link, and retries the retryable codes with a capped, jittered backoff.
- ``Publisher`` publishes idempotent batches: each carries the producer id and a sequence number,
  and a batch whose ack did not come is resent as is, so the broker appends it once.
- ``channel`` opens a channel whose receive limit fits the largest record (gRPC's default, 4 MiB,
  does not).

Generate the stubs first (``python -m grpc_tools.protoc -I proto --python_out=OUT
--grpc_python_out=OUT proto/tapeline/v1/tapeline.proto``) and put OUT on ``sys.path``.
"""

import queue
import random
import threading
import time

import grpc

from tapeline.v1 import tapeline_pb2 as pb
from tapeline.v1 import tapeline_pb2_grpc as rpc

#: The broker's default record limit; a record message holds one record and up to 64 KiB more.
MAX_RECORD_BYTES = 4 << 20

#: Codes after which the same request, sent again later, can succeed (CLIENTS.md, "Retries").
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,  # the broker is shutting down or unreachable
    grpc.StatusCode.DEADLINE_EXCEEDED,  # our own deadline or liveness check
    grpc.StatusCode.ABORTED,
}
#: A subscription may also be resumed after these: a slow consumer ended by its policy, or too
#: many subscriptions at once.
RETRYABLE_SUBSCRIBE = RETRYABLE | {grpc.StatusCode.RESOURCE_EXHAUSTED}


def channel(target, max_record_bytes=MAX_RECORD_BYTES, credentials=None):
    """A channel to ``target`` (``host:port``) that takes the largest record, and pings a quiet
    connection so that a dead one is found (``credentials``: ``grpc.ssl_channel_credentials()``
    for TLS)."""
    options = [
        ("grpc.max_receive_message_length", max_record_bytes + (1 << 20)),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


class Backoff:
    """Waits 100 ms, then twice as long each time up to 5 s, each wait jittered by ±20 %."""

    def __init__(self, first=0.1, most=5.0):
        self.first, self.most, self.next = first, most, first

    def wait(self):
        time.sleep(self.next * random.uniform(0.8, 1.2))
        self.next = min(self.next * 2, self.most)

    def reset(self):
        self.next = self.first


class Subscriber:
    """The records of ``streams`` (names or patterns) from ``start`` on, replayed then live,
    across reconnections: iterate it. ``start`` is ``"beginning"``, ``"now"``, ``("at", tick)`` or
    ``("after", tick)``; ``end`` the last tick (0: follow live forever). ``positions`` (stream ->
    last tick received) and ``complete_to`` are what to keep to resume in another process."""

    def __init__(self, target, streams, start="beginning", end=0, heartbeat=1.0, positions=None,
                 metadata=(), on_event=None, credentials=None, max_record_bytes=MAX_RECORD_BYTES):
        self.target, self.streams, self.start, self.end = target, list(streams), start, end
        self.heartbeat = heartbeat
        self.positions = dict(positions or {})
        self.complete_to = 0
        self.metadata = list(metadata)
        self.on_event = on_event or (lambda kind, detail: None)
        self.channel = channel(target, max_record_bytes, credentials)
        self.stub = rpc.TapelineStub(self.channel)
        self.reconnections = 0

    def floor(self):
        """The tick the subscription starts after: 0 for the beginning (or now)."""
        if self.start in ("beginning", "now"):
            return 0
        kind, tick = self.start
        return max(tick - 1, 0) if kind == "at" else tick

    def request(self):
        """The request that continues exactly where what was received ends."""
        request = pb.SubscribeRequest(streams=self.streams, resume=self.positions, end=self.end,
                                      heartbeat_ms=int(self.heartbeat * 1000))
        if self.complete_to:
            # Every record up to complete_to was received: streams not in `resume` go on after it
            # (never before the start asked for).
            request.after = max(self.complete_to, self.floor())
        elif self.start == "beginning":
            request.beginning.SetInParent()
        elif self.start == "now":
            request.now.SetInParent()
        elif self.start[0] == "at":
            request.at = self.start[1]
        else:
            request.after = self.start[1]
        return request

    def __iter__(self):
        backoff = Backoff()
        # A link silent for longer than this is dead, although TCP may not know it yet.
        silence = 3 * self.heartbeat + 1.0
        while True:
            call = self.stub.Subscribe(self.request(), metadata=self.metadata)
            gone = threading.Event()
            messages = _reader(call, gone)
            try:
                while True:
                    try:
                        kind, message = messages.get(timeout=silence)
                    except queue.Empty:
                        raise _Dead(f"no message for {silence:.1f} s")
                    if kind == "end":
                        if self.end and self.complete_to >= self.end:
                            return  # a bounded interval, delivered whole
                        raise _Dead("the call ended before its end")
                    if kind == "error":
                        raise message
                    backoff.reset()
                    event = message.WhichOneof("event")
                    if event == "records":
                        for record in message.records.records:
                            self.positions[record.stream] = record.tick
                            yield record
                        self.complete_to = max(self.complete_to, message.records.complete_to)
                    elif event == "heartbeat":
                        self.complete_to = max(self.complete_to, message.heartbeat.tail_tick)
                    elif event == "caught_up":
                        self.complete_to = max(self.complete_to, message.caught_up.tick)
                        self.on_event(event, message.caught_up)
                    else:
                        self.note(event, getattr(message, event))
                        self.on_event(event, getattr(message, event))
            except _Dead as dead:
                self.on_event("disconnected", str(dead))
            except grpc.RpcError as error:
                # A record over this client's own receive limit comes again on every retry.
                too_large = "larger than max" in (error.details() or "")
                if error.code() not in RETRYABLE_SUBSCRIBE or too_large:
                    raise
                self.on_event("disconnected", f"{error.code().name}: {error.details()}")
            finally:
                gone.set()
                call.cancel()
            self.reconnections += 1
            backoff.wait()


    def note(self, event, detail):
        """Keeps the positions right across a reconnection after these events (CLIENTS.md)."""
        if event == "stream_added":
            # A stream that appears later is read from the start asked for, or whole when it
            # became visible after it (an import sealed since), not from complete_to.
            info, floor = detail.stream, self.floor()
            self.positions.setdefault(info.name, floor if info.created_tick <= floor else 0)
        elif event in ("truncated", "gap"):
            # What was removed or skipped is behind the stream now.
            tick = detail.through if event == "truncated" else detail.to_tick
            self.positions[detail.stream] = max(self.positions.get(detail.stream, 0), tick)


class _Dead(Exception):
    pass


def _reader(call, gone):
    """The messages of ``call`` through a bounded queue, read by a thread, so that the reader can
    give up waiting: ``("message", m)``, then ``("end", None)`` or ``("error", RpcError)``. The
    thread stops once ``gone`` is set (nobody reads the queue any more)."""
    messages = queue.Queue(maxsize=64)

    def put(item):
        while not gone.is_set():
            try:
                messages.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def read():
        try:
            for message in call:
                if not put(("message", message)):
                    return
            put(("end", None))
        except grpc.RpcError as error:
            put(("error", error))

    threading.Thread(target=read, daemon=True).start()
    return messages


class Publisher:
    """Publishes idempotent batches as ``producer_id``: ``publish`` returns the ticks once the
    batch is durable, resending it as is after any retryable failure. Sequences start after
    ``last_sequence`` (keep the last one to continue in another process)."""

    def __init__(self, target, producer_id, last_sequence=0, metadata=(), timeout=10.0,
                 credentials=None):
        self.stub = rpc.TapelineStub(channel(target, credentials=credentials))
        self.producer_id, self.sequence = producer_id, last_sequence
        self.metadata, self.timeout = list(metadata), timeout
        self.retries = 0

    def publish(self, records, give_up_after=120.0):
        """Appends ``records`` (``(stream, payload bytes)`` pairs or ``pb.Record``) as one batch."""
        self.sequence += 1
        batch = pb.PublishRequest(producer_id=self.producer_id, sequence=self.sequence, batch_id=self.sequence)
        for record in records:
            batch.records.append(record if isinstance(record, pb.Record)
                                 else pb.Record(stream=record[0], payload=record[1]))
        backoff, deadline = Backoff(), time.monotonic() + give_up_after
        while True:
            try:
                ack = self.stub.Publish(batch, timeout=self.timeout, metadata=self.metadata)
                return list(ack.ticks)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or time.monotonic() > deadline:
                    raise
                self.retries += 1
                backoff.wait()
