#!/usr/bin/env python3
"""Exercise 2: exercise 1 plus pre-shared-key authentication and ``/authorize``.

Every protected request carries ``Authorization: KV-HMAC-SHA256 keyid=..., ts=..., nonce=..., sig=...``,
an HMAC-SHA256 over the method, host, raw path and query, and the SHA-256 of the body, with a clock
window and one-time nonces (see README). ``GET`` or ``POST /authorize`` answers
``{"authorized": true, "key_id": ..., "role": ..., "prefix": ...}`` for a correctly signed request: each line
of the keys file may scope its key with ``role=read|write|admin`` and ``prefix=P`` (a line without options is an
admin with no prefix).

Run: ``python exercise2.py --config config.yaml``.

Dependencies:
- Tornado, the web framework and event loop: https://www.tornadoweb.org/
- PyYAML, to read ``config.yaml``: https://pyyaml.org/wiki/PyYAMLDocumentation
- hmac, hashlib and secrets from the standard library: https://docs.python.org/3/library/hmac.html
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvtornado.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], exercise=2, default_config=Path(__file__).resolve().with_name("config.yaml")))
