"""The local S3 server every object-store test uses (tests/test_store.py, tests/test_cache.py): moto's standalone
server on a free 127.0.0.1 port with authentication on, behind a relay (tools/request_relay.py) that counts
requests and can be cut, made once per session because DALI's AWS client keeps the first endpoint it saw for
the whole process. conftest.py makes the fixtures visible to every test module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shards import store as store_module
from tools.local_s3 import free_port, wait_for_port

BUCKET = "shards"


def die_with_pytest() -> None:
    """preexec_fn of the server and relay processes: killed with the test process (Linux PR_SET_PDEATHSIG), so a
    run stopped by a timeout or Ctrl-C leaves no server behind."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


class Relay:
    """tools/request_relay.py in its own process, 127.0.0.1:port -> the S3 server: `stop()` drops every
    connection and refuses new ones, `start()` serves again, `start(budget=N)` cuts each connection after N bytes
    towards the client, `start(slow_down_every=K)` answers every K-th request without a body 503 SlowDown."""

    def __init__(self, target: int, folder: Path) -> None:
        self.target, self.port, self.folder = target, free_port(), folder
        self.count_file, self.request_file = folder / "connections", folder / "requests"
        self.budget: int | None = None  # bytes per connection towards the client, then it is cut
        self.slow_down_every: int | None = None
        self._process: subprocess.Popen | None = None
        self.start()

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        return len(self.count_file.read_text().splitlines()) if self.count_file.exists() else 0

    def requests(self) -> list[str]:
        """Every request relayed so far, `METHOD PATH`, in order."""
        return self.request_file.read_text().splitlines() if self.request_file.exists() else []

    def start(self, *, budget: int | None = None, slow_down_every: int | None = None) -> None:
        self.stop()
        self.budget, self.slow_down_every = budget, slow_down_every
        command = [sys.executable, "-m", "tools.request_relay", str(self.port), str(self.target),
                   "--connections", str(self.count_file), "--requests", str(self.request_file)]
        command += ["--budget", str(budget)] if budget is not None else []
        command += ["--slow-down-every", str(slow_down_every)] if slow_down_every is not None else []
        self._process = subprocess.Popen(command, preexec_fn=die_with_pytest, cwd=Path(__file__).parent.parent)
        wait_for_port(self.port, timeout=30.0)

    @property
    def plain(self) -> bool:
        """Serving without faults."""
        return self._process is not None and self.budget is None and self.slow_down_every is None

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server with authentication on, an IAM user allowed everything, and the bucket; yields
    (relay, access key id, secret key). Credentials are enforced from the 4th request on, so wrong keys fail
    as on a real store."""
    import boto3

    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=die_with_pytest,
    )
    try:
        wait_for_port(port, timeout=30.0)
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name="us-east-1")
        iam.create_user(UserName="saturate")
        key = iam.create_access_key(UserName="saturate")["AccessKey"]
        iam.put_user_policy(UserName="saturate", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key["AccessKeyId"],
                     aws_secret_access_key=key["SecretAccessKey"], region_name="us-east-1").create_bucket(Bucket=BUCKET)
        relay = Relay(port, tmp_path_factory.mktemp("relay"))
        yield relay, key["AccessKeyId"], key["SecretAccessKey"]
        relay.stop()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def use_server(mp: pytest.MonkeyPatch, s3_server: tuple, tmp_path: Path) -> None:
    """The standard AWS variables pointing at the local server (what a user sets for MinIO or Ceph); no user
    config file, no instance metadata lookups."""
    relay, key_id, secret = s3_server
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        mp.delenv(name, raising=False)
    mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{relay.port}")
    mp.setenv("AWS_ACCESS_KEY_ID", key_id)
    mp.setenv("AWS_SECRET_ACCESS_KEY", secret)
    mp.setenv("AWS_REGION", "us-east-1")
    mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture()
def s3_env(s3_server, monkeypatch, tmp_path):
    """use_server for one test, with the store failing fast when a test cuts it; yields the relay."""
    relay = s3_server[0]
    use_server(monkeypatch, s3_server, tmp_path)
    # fail fast when the tests cut the store; the defaults are for real stores. Two tries per request, the first
    # included (AWS's way of counting since the bounded-time rule): a dropped connection is resumed once
    monkeypatch.setattr(store_module, "REQUEST_ATTEMPTS", 2)
    monkeypatch.setattr(store_module, "RETRY_BACKOFF", 0.05)
    if not relay.plain:
        relay.start()
    yield relay
    if not relay.plain:
        relay.start()
