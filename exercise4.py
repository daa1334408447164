#!/usr/bin/env python3
"""Exercise 4, the main job: exercise 3 plus an in-memory write-behind cache.

Reads are served from memory; ``/save`` and ``/delete`` are acknowledged at once and written to sqlite
in coalesced batches by a periodic callback (every ``cache.flush_interval_ms``), early when
``cache.flush_batch_size`` keys are dirty, and at once for ``POST /flush`` or ``?durable=1``.
``GET /stats`` shows the counters. SIGINT/SIGTERM flushes everything and exits 0 (non-zero, with the
count, when it cannot within ``cache.shutdown_timeout_s``).

Run: ``python exercise4.py --config config.yaml`` (``make run`` does this in a fresh venv).

Dependencies:
- Tornado, the web framework, event loop and PeriodicCallback: https://www.tornadoweb.org/
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
    sys.exit(main(sys.argv[1:], exercise=4, default_config=Path(__file__).resolve().with_name("config.yaml")))
