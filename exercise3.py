#!/usr/bin/env python3
"""Exercise 3: exercise 2 plus ``/save``, ``/get`` and ``/delete`` on sqlite, write-through.

Every write is committed to sqlite (WAL journal) before its answer; commits and reads run on their
own threads, never on the event loop.

Run: ``python exercise3.py --config config.yaml``.

Dependencies:
- Tornado, the web framework and event loop: https://www.tornadoweb.org/
- PyYAML, to read ``config.yaml``: https://pyyaml.org/wiki/PyYAMLDocumentation
- sqlite3 from the standard library: https://docs.python.org/3/library/sqlite3.html
- psycopg 3 and psycopg_pool, with ``storage.backend: postgresql`` only: https://www.psycopg.org/psycopg3/docs/
- hmac, hashlib and secrets from the standard library: https://docs.python.org/3/library/hmac.html
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvtornado.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], exercise=3, default_config=Path(__file__).resolve().with_name("config.yaml")))
