"""A store that stops answering: moto's S3 server (started here on 127.0.0.1, nothing reaches the network) frozen
with SIGSTOP, so it still accepts connections and never answers. Every read ends within the time bound the
store states (shards.store's bounded-time rule) with one line, and a stop request ends the wait sooner.

Before the rule a frozen store held a pytorch val read ~994 s: a 60 s read timeout x botocore's 4 tries x the
store's own 4. Here the timeouts are shortened (module constants) and the tries set as a user sets them, with
the standard AWS_MAX_ATTEMPTS; the rule is the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from pipeline import ShardReadError, build_loader
from shards import store as store_module
from shards.process import StopRequested, clear_stop, request_stop, stop_interrupts
from shards.store import StoreError, open_store
from tools.local_s3 import free_port, upload, wait_for_port

URL = "s3://frozen/ds"
SLACK = 2.0  # seconds beyond the stated bound: process start-up and scheduling on a busy machine


@pytest.fixture(scope="module")
def server(tiny_shards, tmp_path_factory):
    """moto's S3 server with tiny_shards uploaded to URL and a 24 MiB object `big.bin`; yields (its Popen, the
    AWS variables that point at it)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "local",
           "AWS_SECRET_ACCESS_KEY": "local", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": str(tmp_path_factory.mktemp("aws") / "none")}
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            wait_for_port(port, timeout=30.0)
            import boto3

            boto3.client("s3").create_bucket(Bucket="frozen")
            upload(tiny_shards, URL)
            payload = np.random.default_rng(0).integers(0, 256, 24 * 2**20, dtype=np.uint8).tobytes()
            open_store(URL).put_bytes("big.bin", payload)
        yield server, env
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture()
def frozen(server, monkeypatch):
    """The AWS variables pointing at the server, two tries per request (AWS_MAX_ATTEMPTS), 1 s timeouts; yields a
    function that freezes the server (SIGSTOP), thawed again afterwards."""
    server, env = server
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    for name in ("CONNECT_TIMEOUT", "READ_TIMEOUT", "CONTROL_READ_TIMEOUT"):
        monkeypatch.setattr(store_module, name, 1.0)
    clear_stop()
    yield lambda: os.kill(server.pid, signal.SIGSTOP)
    os.kill(server.pid, signal.SIGCONT)
    clear_stop()


def test_a_pytorch_read_from_a_frozen_store_fails_within_the_stated_bound(frozen):
    """The drill: a pytorch val loader on s3://, the server frozen before the read. It waited ~994 s; now one
    line naming the tar within 2 tries x (1 s + 1 s) + 0.5 s."""
    loader = build_loader(URL, "val", train=False, batch_size=4, image_size=32, backend="pytorch", num_threads=1)
    bound = open_store(URL).time_bound(data=True)
    assert bound == 2 * (1.0 + 1.0) + 0.5  # AWS_MAX_ATTEMPTS is honoured
    frozen()
    started = time.monotonic()
    with pytest.raises(ShardReadError) as caught:
        for _ in loader:
            pass
    elapsed = time.monotonic() - started
    loader.close()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{URL}/val-000000.tar: reading stopped at byte 0 after 2 attempts (Read timeout on "
                              "endpoint URL"), message
    assert message.endswith("2 tries within the store's bound of 4 s; AWS_MAX_ATTEMPTS sets the tries); the shard "
                            "could not be read from the store"), message
    assert 2 * 1.0 <= elapsed <= bound + SLACK, elapsed


@pytest.mark.parametrize("request_kind", ["listing", "head", "small object", "stream broken mid-object"])
def test_every_request_to_a_frozen_store_fails_within_the_stated_bound(frozen, request_kind):
    store = open_store(URL)
    data = request_kind in ("small object", "stream broken mid-object")
    bound = store.time_bound(data=data)
    stream = None
    if request_kind == "stream broken mid-object":
        stream = store.open("big.bin")
        assert len(stream.read(2**20)) == 2**20  # the server answered, the object is on its way
    read = {"listing": lambda: store.sizes(), "head": lambda: store.size("val.manifest.json"),
            "small object": lambda: store.read_bytes("val.manifest.json"),
            "stream broken mid-object": lambda: stream.read()}[request_kind]
    frozen()
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        read()  # a stream first drains what the socket holds, then its ranged GETs stall
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert message.startswith("s3://frozen/ds") and "\n" not in message
    assert "tries within the store's bound of" in message, message
    if request_kind == "stream broken mid-object":
        assert "big.bin: reading stopped at byte " in message and "after 2 attempts" in message, message
    assert elapsed <= bound + SLACK, (elapsed, bound)


def test_a_stop_request_ends_a_wait_on_a_frozen_store_early(frozen, monkeypatch):
    """What the trainer does on SIGTERM: its handler calls request_stop, and the data wait inside
    stop_interrupts() gives up at once instead of waiting out the store's bound."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "10")  # a bound of about 2 minutes
    monkeypatch.setattr(store_module, "READ_TIMEOUT", 20.0)
    loader = build_loader(URL, "val", train=False, batch_size=4, image_size=32, backend="pytorch", num_threads=1)
    assert open_store(URL).time_bound(data=True) > 200
    batches = iter(loader)
    frozen()
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: request_stop("stopped by SIGUSR2"))
    try:
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR2))
        timer.start()
        started = time.monotonic()
        with pytest.raises(StopRequested, match="stopped by SIGUSR2"), stop_interrupts():
            next(batches)
        assert time.monotonic() - started < 1.0 + SLACK
    finally:
        signal.signal(signal.SIGUSR2, previous)
    started = time.monotonic()
    loader.close()  # its worker sits in a 20 s read: the DataLoader's shutdown does not wait for it
    del batches
    assert time.monotonic() - started < 10

    # without stop_interrupts (another thread, a read in progress): the store gives up before its next try
    clear_stop()
    store = open_store(URL)
    threading.Timer(0.5, request_stop, ("stopped by SIGTERM",)).start()
    monkeypatch.setattr(store_module, "READ_TIMEOUT", 1.0)
    started = time.monotonic()
    with pytest.raises(StopRequested, match=f"^{URL}/val.manifest.json: abandoned, stopped by SIGTERM$"):
        store.read_bytes("val.manifest.json")
    assert time.monotonic() - started < 1.0 + SLACK  # the try in progress (1 s), not 10 tries
