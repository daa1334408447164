#!/usr/bin/env python3
"""Exercise 1: a Tornado server answering ``GET /ping`` with ``{"ping": "pong"}``.

Run: ``python exercise1.py --config config.yaml`` (``--host``/``--port`` override the config).

Dependencies:
- Tornado, the web framework and event loop: https://www.tornadoweb.org/
- PyYAML, to read ``config.yaml``: https://pyyaml.org/wiki/PyYAMLDocumentation
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvtornado.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], exercise=1, default_config=Path(__file__).resolve().with_name("config.yaml")))
