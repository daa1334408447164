"""``python -m bench [options]``: the HTTP bench; ``python -m bench flush``: the flush bench;
``python -m bench profile``: py-spy breakdown of a server's CPU per request; ``python -m bench counter``: lost updates;
``python -m bench asgi --python PY``: /ping on our Tornado server against Starlette/uvicorn."""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    if argv and argv[0] == "flush":
        from bench import flush_bench

        return flush_bench.main(argv[1:])
    if argv and argv[0] == "asgi":
        from bench import asgi_ceiling

        return asgi_ceiling.main(argv[1:])
    if argv and argv[0] == "counter":
        from bench import counter

        return counter.main(argv[1:])
    if argv and argv[0] == "profile":
        from bench import profile_server

        return profile_server.main(argv[1:])
    from bench import run

    return run.main(argv)


if __name__ == "__main__":
    sys.exit(main())
