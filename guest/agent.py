"""hvctl-agent: the in-guest agent.

Only the entry point exists so far: the RPC server and workloads are separate issues, and until they land the command
says so instead of pretending to serve.
"""

from __future__ import annotations

import argparse
import sys

VERSION = "0.1.0"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hvctl-agent", description="hvctl's in-guest agent")
    parser.add_argument("--version", action="version", version=f"hvctl-agent {VERSION}")
    parser.add_argument("command", nargs="?", choices=["serve"], help="serve the agent RPC")
    args = parser.parse_args(argv)
    if args.command == "serve":
        print("hvctl-agent: error: the agent RPC server is not implemented yet", file=sys.stderr)
        return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
