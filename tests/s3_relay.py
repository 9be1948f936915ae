"""A TCP relay for the object-store tests, run as its own process (`python tests/s3_relay.py PORT TARGET
[BUDGET COUNT_FILE]`): DALI's reader blocks the test process's Python threads while it reads, so the relay
cannot live in the test process. Killing the process drops every connection and refuses new ones (a store that
went away); BUDGET cuts each connection after that many bytes towards the client (a store that drops
connections mid-object). COUNT_FILE gets one line per accepted connection."""

from __future__ import annotations

import socket
import sys
import threading


def pump(source: socket.socket, sink: socket.socket, budget: int | None) -> None:
    try:
        while data := source.recv(65536):
            if budget is not None:
                data = data[:budget]
                budget -= len(data)
            sink.sendall(data)
            if budget == 0:
                break
    except OSError:
        pass
    for s in (source, sink):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


def main(port: int, target: int, budget: int | None, count_file: str | None) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(64)
    while True:
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", target))
        if count_file:
            with open(count_file, "a") as f:
                f.write("connection\n")
        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, budget), daemon=True).start()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]), int(args[1]), int(args[2]) if len(args) > 2 and args[2] != "-" else None,
         args[3] if len(args) > 3 else None)
