"""Run a command against a copy of a shard folder on a local S3-protocol server (moto), for benchmarks.

    python3 -m tools.local_s3 SHARDS -- python3 -m tools.cli profile {url} --out prof-s3 --modes loader

Starts moto's standalone server on a free 127.0.0.1 port, creates a bucket, uploads every split's shards,
indexes and manifests from SHARDS through the product's own store (shards.store), runs the command with `{url}`
replaced by `s3://BUCKET/shards` and the standard AWS variables pointing at the server (what a user sets for
MinIO or Ceph), then stops the server. Nothing leaves the machine.

moto serves every ranged GET by reading the whole object, so loader figures through it are bound by the server
(docs/benchmarks.md); they show that reading from a store works at scale, not what a real store sustains.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "saturate-bench"
PREFIX = "shards"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the local S3 server did not open 127.0.0.1:{port} within {timeout:.0f} s")


def upload(shards: Path, url: str) -> int:
    """Copy every split's tars, indexes and manifest from the folder `shards` to the store at `url`; returns
    the bytes uploaded."""
    from shards.schema import INDEX_EXT, SHARD_EXT, manifest_name, splits_in
    from shards.store import open_store

    source, target = open_store(shards), open_store(url)
    target.prepare()
    names = [p.name for p in sorted(Path(shards).iterdir()) if p.suffix in (f".{SHARD_EXT}", f".{INDEX_EXT}")]
    total = 0
    for name in names:
        target.put_file(Path(shards) / name, name)
        total += (Path(shards) / name).stat().st_size
    for split in splits_in(source):  # manifests last: a manifest names shards that are already there
        name = manifest_name(split)
        target.put_bytes(name, source.read_text(name))
    return total


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("local_s3: error: usage: python3 -m tools.local_s3 SHARDS -- COMMAND ... {url} ...", file=sys.stderr)
        return 2
    split_at = argv.index("--")
    parser = argparse.ArgumentParser(prog="python3 -m tools.local_s3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", help="a local shard folder to serve")
    args = parser.parse_args(argv[:split_at])
    command = argv[split_at + 1:]
    if not command or not Path(args.shards).is_dir():
        print(f"local_s3: error: need a shard folder ({args.shards}) and a command after --", file=sys.stderr)
        return 2
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**os.environ, **CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        url = f"s3://{BUCKET}/{PREFIX}"
        start = time.perf_counter()
        size = upload(Path(args.shards), url)
        print(f"local_s3: {size / 1e6:.0f} MB uploaded to {url} at {endpoint} in {time.perf_counter() - start:.1f} s",
              flush=True)
        return subprocess.run([part.replace("{url}", url) for part in command], env=env).returncode
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
