"""The Python client against the real broker (run by .ci/run, or by hand:
``examples/python/run_test.sh``): a publisher and a resumable subscriber while the broker is
killed and restarted under them and stopped for longer than the subscriber's liveness allows;
the subscriber must end with exactly the published sequence, and a record of the largest size
must arrive whole.

Usage: python test_client.py TAPELINE_BINARY
"""

import os
import shutil
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import tapeline_client as tc

BATCHES = 300
#: Times the broker is killed (SIGKILL) and started again on the same data dir while publishing.
KILLS = 3
#: Give up on anything after this long.
WITHIN = 120.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """``tapeline serve`` on a fixed port and data dir, started again after each kill."""

    def __init__(self, binary, data, port):
        self.binary, self.data, self.port, self.process = binary, data, port, None
        self.starts = 0

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, "serve", "--listen", f"127.0.0.1:{self.port}", "--data", self.data,
             "--heartbeat", "200ms"],
            stdout=subprocess.PIPE, stderr=open(os.path.join(self.data + ".log"), "a"), text=True)
        line = self.process.stdout.readline()
        assert line.startswith("tapeline listening on"), f"unexpected first line {line!r}"
        self.starts += 1

    def kill(self):
        self.process.kill()
        self.process.wait()

    def pause(self, seconds):
        """A silent link: the broker stops answering (SIGSTOP), then goes on."""
        self.process.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.process.send_signal(signal.SIGCONT)


def main(binary):
    workdir = tempfile.mkdtemp(prefix="tapeline-python-")
    broker = Broker(binary, os.path.join(workdir, "data"), free_port())
    broker.start()
    try:
        run(broker)
    finally:
        # Also when a check fails: no broker is left behind.
        if broker.process.poll() is None:
            broker.process.send_signal(signal.SIGCONT)
            broker.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def run(broker):
    target = f"127.0.0.1:{broker.port}"
    began = time.monotonic()

    received, events = [], []
    subscriber = tc.Subscriber(target, ["py/**"], heartbeat=0.2,
                               on_event=lambda kind, detail: events.append((kind, str(detail)[:80])))
    expected_count = 2 * BATCHES + 1

    def follow():
        for record in subscriber:
            received.append((record.stream, record.tick, bytes(record.payload)))
            if len(received) >= expected_count:
                return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()

    publisher = tc.Publisher(target, producer_id="python-test")
    published = []

    def publish():
        for i in range(1, BATCHES + 1):
            batch = [("py/a", b"a%d" % i), ("py/b", b"b%d" % i)]
            ticks = publisher.publish(batch)
            published.extend((stream, tick, payload) for (stream, payload), tick in zip(batch, ticks))
            time.sleep(0.01)

    writer = threading.Thread(target=publish, daemon=True)
    writer.start()
    # Meanwhile the broker stops answering for longer than the subscriber's liveness allows (a
    # silent link, while it follows live), then is killed and restarted, down for 300 ms each
    # time, so that batches are in flight or sent while it is away.
    deadline = time.monotonic() + 10
    while len(received) < 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    broker.pause(2.0)
    for _ in range(KILLS):
        time.sleep(random.uniform(0.3, 0.6))
        broker.kill()
        time.sleep(0.3)
        broker.start()
    writer.join(timeout=max(1.0, WITHIN - (time.monotonic() - began)))
    assert not writer.is_alive(), "publishing took too long"
    # The largest record the broker takes (4 MiB): more than gRPC's default receive limit.
    large = os.urandom(tc.MAX_RECORD_BYTES)
    (tick,) = publisher.publish([("py/large", large)])
    published.append(("py/large", tick, large))

    reader.join(timeout=max(1.0, WITHIN - (time.monotonic() - began)))
    assert not reader.is_alive(), f"the subscriber got {len(received)} of {expected_count} records; events {events[-5:]}"
    key = lambda r: (r[0], r[1])
    assert sorted(received, key=key) == sorted(published, key=key), "not exactly what was published"
    for stream in ("py/a", "py/b"):
        ticks = [t for s, t, _ in received if s == stream]
        assert ticks == sorted(set(ticks)), f"{stream}: ticks out of order or repeated"
    disconnections = [e for e in events if e[0] == "disconnected"]
    silent = [e for e in disconnections if e[1].startswith("no message")]
    assert len(disconnections) >= KILLS, f"the kills were not noticed: {events}"
    assert publisher.retries > 0, "no batch was resent: the kills missed the publisher"
    assert silent, f"the silent link was not noticed: {disconnections}"
    print(f"python client: {len(received)} records exactly once, in order, across {broker.starts - 1} broker "
          f"restarts and a {2.0:.0f} s silent link ({len(disconnections)} disconnections, "
          f"{len(silent)} by liveness; {publisher.retries} publish retries; a 4 MiB record whole) "
          f"in {time.monotonic() - began:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1])
