"""A tenant's side of the demo: a streamed chat completion from a VM's model server, over plain HTTP.

``python -m framework.devhost.tenant chat --port P --model M --message TEXT`` talks to ``http://127.0.0.1:P``, where the
tenant's ``ssh -L`` (``hvctl serve NAME forward``) brings the server's API, and prints the answer as its
server-sent events arrive. ``wait-port P`` waits for that forward to listen. Standard library only: it stands for
whatever client a tenant brings (the ``openai`` package, curl).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time


def wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s") from None
            time.sleep(0.5)


def chat(port: int, model: str, message: str, max_tokens: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": model, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
        "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {response.read().decode(errors='replace')}")
    text = ""
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise SystemExit(f"the server failed the request: {event['error']['message']}")
        piece = event["choices"][0]["delta"].get("content", "")
        text += piece
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    conn.close()
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m framework.devhost.tenant", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    waiting = sub.add_parser("wait-port")
    waiting.add_argument("port", type=int)
    waiting.add_argument("--timeout", type=float, default=120)
    talk = sub.add_parser("chat")
    talk.add_argument("--port", type=int, required=True)
    talk.add_argument("--model", required=True)
    talk.add_argument("--message", required=True)
    talk.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if args.command == "wait-port":
        wait_port(args.port, args.timeout)
    else:
        chat(args.port, args.model, args.message, args.max_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
