"""An HTTP relay on 127.0.0.1 in front of an http:// object store, run as its own process: it counts every
request that passes, whoever sends it (boto3, or the AWS C++ SDK inside DALI's reader, which no Python hook
sees), and for tests it can answer requests with `503 Slow Down` or cut connections.

    python -m tools.request_relay PORT [HOST:]PORT --requests FILE [--connections FILE] [--slow-down-every K]
        [--budget BYTES]

--requests FILE     one line per request, `METHOD PATH` (what the profiler counts requests per image from)
--connections FILE  one line per accepted connection
--slow-down-every K every K-th request without a body (GET, HEAD, a listing) is answered `503 Slow Down` with
                    S3's `SlowDown` error instead of being forwarded (a store throttling its clients)
--budget BYTES      each connection is cut after that many bytes towards the client (a store that drops
                    connections mid-object)

Why a process of its own: DALI's reader holds the GIL-free C++ side busy but blocks the Python threads of the
process that runs it while it reads, so a relay inside that process would stall its own client. Requests are
parsed only as far as counting needs (request line, Content-Length or chunked body); the bytes pass unchanged.
Plain http:// only: an https:// store cannot be counted here (the profiler then says n/a).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading

SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: "
             + str(len(SLOW_DOWN_BODY)).encode() + b"\r\n\r\n" + SLOW_DOWN_BODY)


class Counter:
    """Lines appended to a file, one per event, from any thread (None: not kept)."""

    def __init__(self, path: str | None) -> None:
        self.count, self._path, self._lock = 0, path, threading.Lock()

    def add(self, line: str) -> int:
        with self._lock:
            self.count += 1
            if self._path:
                with open(self._path, "a") as f:
                    f.write(line + "\n")
            return self.count


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def to_client(upstream: socket.socket, client: socket.socket, budget: int | None, send: threading.Lock) -> None:
    """Answers from the store to the client, cut after `budget` bytes when given."""
    try:
        while data := upstream.recv(65536):
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            with send:
                client.sendall(data)
            if budget == 0:
                break
    except OSError:
        pass
    _close(upstream, client)


class Requests:
    """The client's bytes parsed into requests: each counted, forwarded, or answered 503 (see the module doc)."""

    def __init__(self, requests: Counter, slow_down_every: int | None) -> None:
        self.requests, self.slow_down_every = requests, slow_down_every

    def relay(self, client: socket.socket, upstream: socket.socket, send: threading.Lock) -> None:
        buffer, state, left, forward = b"", "head", 0, True
        try:
            while data := client.recv(65536):
                buffer += data
                while buffer:
                    if state in ("body", "chunk"):  # `left` bytes of body (a chunk: its data and CRLF) to pass on
                        part, buffer = buffer[:left], buffer[left:]
                        left -= len(part)
                        if forward:
                            upstream.sendall(part)
                        if not left:
                            state = "size" if state == "chunk" else "head"
                        continue
                    line_end = buffer.find(b"\r\n\r\n" if state == "head" else b"\r\n")
                    if line_end < 0:
                        break
                    cut = line_end + (4 if state == "head" else 2)
                    line, buffer = buffer[:cut], buffer[cut:]
                    if forward or state == "head":
                        forward = self._head(line, client, send) if state == "head" else forward
                        if forward:
                            upstream.sendall(line)
                    if state == "head":
                        headers = dict(self._headers(line))
                        left = int(headers.get("content-length", 0) or 0)
                        state = ("size" if "chunked" in headers.get("transfer-encoding", "").lower()
                                 else "body" if left else "head")
                    elif state == "size":  # a chunk's size line; size 0 ends the data, trailers follow
                        left = int(line.split(b";")[0].strip() or b"0", 16)
                        state, left = ("chunk", left + 2) if left else ("trailers", 0)
                    elif state == "trailers" and line == b"\r\n":
                        state = "head"
        except OSError:
            pass
        _close(client, upstream)

    @staticmethod
    def _headers(head: bytes) -> list[tuple[str, str]]:
        lines = head.decode("latin-1").split("\r\n")[1:]
        return [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines if x)]

    def _head(self, head: bytes, client: socket.socket, send: threading.Lock) -> bool:
        """Count a request; False when it is answered 503 here instead of being forwarded."""
        method, path = (head.decode("latin-1").split("\r\n", 1)[0].split(" ") + ["", ""])[:2]
        headers = dict(self._headers(head))
        bodiless = not int(headers.get("content-length", 0) or 0) and "transfer-encoding" not in headers
        number = self.requests.add(f"{method} {path}")
        if self.slow_down_every and bodiless and number % self.slow_down_every == 0:
            with send:
                client.sendall(SLOW_DOWN)
            return False
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.request_relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int, help="port to listen on (127.0.0.1)")
    parser.add_argument("target", help="the store: PORT on 127.0.0.1, or HOST:PORT")
    parser.add_argument("--requests", metavar="FILE")
    parser.add_argument("--connections", metavar="FILE")
    parser.add_argument("--slow-down-every", type=int, metavar="K")
    parser.add_argument("--budget", type=int, metavar="BYTES")
    args = parser.parse_args(argv)
    requests, connections = Requests(Counter(args.requests), args.slow_down_every), Counter(args.connections)
    host, _, port = args.target.rpartition(":")
    target = (host or "127.0.0.1", int(port))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(128)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(target)
        except OSError:
            _close(client)
            continue
        connections.add("connection")
        send = threading.Lock()
        threading.Thread(target=requests.relay, args=(client, upstream, send), daemon=True).start()
        threading.Thread(target=to_client, args=(upstream, client, args.budget, send), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
