"""The ``kvtornado`` command that ``pip install .`` puts on the PATH (SPEC §11).

    kvtornado serve   [--config PATH] [--host H] [--port P] [--log-level L] [--log-format text|json]
    kvtornado client  [--config PATH] [--url URL] [--key-id ID] [--cafile PEM] COMMAND ...
    kvtornado keys add ID [--role R] [--prefix P] [--config PATH]
    kvtornado backup  OUT [--config PATH] [--url URL [--key-id ID] [--cafile PEM]]
    kvtornado restore IN  [--config PATH]

``--config`` defaults to ``config.yaml`` in the working directory; ``keys``, ``backup`` and ``restore`` use
the built-in defaults (paths under the working directory) when that default file does not exist. ``serve`` is
exercise 4's server and ``client`` the client command line (``python -m kvtornado.client``), each with its own
options and exit statuses. The others: 0 done, 1 failed (a server that cannot be reached or refused the flush, a
file that cannot be written), 2 bad usage or refused (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvtornado.config import Config, load_config, parse_config
from kvtornado.errors import ConfigError, StorageError
from kvtornado.policy import ROLES, Grant

PROG = "kvtornado"
DEFAULT_CONFIG = Path("config.yaml")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Failed(Exception):
    """The command ran and failed (exit status 1)."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="kvtornado: an authenticated key/value HTTP service (serve it, call it, add keys, "
                               "back its sqlite database up and restore it).",
        epilog="Every command takes --help. --config defaults to config.yaml in the working directory. Exit "
               "status of keys, backup and restore: 0 done, 1 failed, 2 bad usage or refused.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # serve and client are handed their arguments untouched (main); these two entries are for --help only.
    sub.add_parser("serve", add_help=False, help="run the server (exercise 4: the write-behind cache), until "
                                                 "SIGINT or SIGTERM")
    sub.add_parser("client", add_help=False, help="signed requests to a server (python -m kvtornado.client)")

    def config(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--config", type=Path, metavar="PATH",
                         help="config file (default: config.yaml here, or the built-in defaults if it is missing)")

    keys = sub.add_parser("keys", help="manage the keys file (auth.secret_file)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    add = keys_sub.add_parser(
        "add", help="append a fresh key and print its secret", description=(
            "Append '<ID> <secret> role=R [prefix=P]' to the keys file, creating it (mode 0600, its folder 0700) "
            "when missing, and print the new secret on stdout, once. A running server reads the file when it "
            "starts: restart it to use the key."))
    add.add_argument("key_id", metavar="ID", help="the new key id ([A-Za-z0-9._-]{1,64}, not in the file yet)")
    add.add_argument("--role", choices=ROLES, default="admin", help="what it may do (default: %(default)s)")
    add.add_argument("--prefix", metavar="P", help="only keys that start with P, as plain text (written "
                                                   "percent-encoded; default: every key)")
    config(add)

    backup = sub.add_parser(
        "backup", help="copy the sqlite database, also while a server runs", description=(
            "A consistent copy of storage.path with sqlite's online backup API, while a server runs or not. "
            "OUT is replaced whole (mode 0600). With --url, that server is first asked to POST /flush, so the "
            "writes it has acknowledged but not yet written are in the copy."))
    backup.add_argument("out", type=Path, metavar="OUT", help="the backup file to write")
    config(backup)
    backup.add_argument("--url", help="the running server to flush first, e.g. http://127.0.0.1:8888")
    backup.add_argument("--key-id", metavar="ID", help="with --url: the key id to sign /flush with (an admin "
                                                       "key; default: the first admin key of the keys file)")
    backup.add_argument("--cafile", metavar="PEM", help="with an https:// --url: trust only this CA")

    restore = sub.add_parser(
        "restore", help="put a backup in place of the database (no server may be running)", description=(
            "Copy IN over storage.path with sqlite's online backup API. Refused while a server holds the "
            "database, or when IN is not a sound kvtornado database. Versions never go back: the restored "
            "file hands out only versions above every one the replaced file handed out."))
    restore.add_argument("source", type=Path, metavar="IN", help="a backup made by kvtornado backup")
    config(restore)
    return p


def _config(path: Path | None) -> Config:
    """``--config``, else config.yaml here, else the built-in defaults rooted here."""
    if path is not None:
        return load_config(path)
    if DEFAULT_CONFIG.exists():
        return load_config(DEFAULT_CONFIG)
    return parse_config(None, label="built-in defaults", base_dir=Path.cwd())


def _sqlite_only(cfg: Config, what: str, tool: str) -> None:
    if cfg.storage.backend != "sqlite":
        raise ConfigError(f"storage.backend is {cfg.storage.backend}: kvtornado {what} copies sqlite "
                          f"databases only; use {tool}")


def _keys_add(args: argparse.Namespace) -> int:
    from kvtornado.auth import add_key
    from kvtornado.policy import encode_prefix

    prefix: str | None = args.prefix
    if prefix is not None:
        if not prefix:
            raise ConfigError("--prefix must not be empty (leave it out for every key)")
        try:
            encode_prefix(prefix)
        except UnicodeEncodeError:
            raise ConfigError("--prefix is not valid UTF-8 text") from None
    cfg = _config(args.config)
    path = cfg.auth.secret_file
    secret, created = add_key(path, args.key_id, Grant(args.role, prefix))
    print(secret)  # the only thing on stdout: `SECRET=$(kvtornado keys add ...)` takes it as it is
    sys.stdout.flush()
    scope = f"role {args.role}" + (f", prefix {prefix!r}" if prefix is not None else "")
    print(f"{'created' if created else 'added to'} {path}: key id {args.key_id!r} ({scope}); restart the server "
          "to use it", file=sys.stderr)
    return EXIT_OK


def _flush(cfg: Config, url: str, key_id: str | None, cafile: str | None) -> int:
    """POST /flush to ``url``, signed as ``key_id`` or the keys file's first admin key; the count flushed."""
    import http.client

    from kvtornado.auth import load_keys
    from kvtornado.client import KVClient, KVClientError, KVConnectionError, KVProtocolError, Signer
    from kvtornado.policy import ADMIN

    keys = load_keys(cfg.auth.secret_file, create=False)
    if key_id is None:
        key_id = next((k for k, grant in keys.grants.items() if grant.role == ADMIN), None)
        if key_id is None:
            raise ConfigError(f"{cfg.auth.secret_file}: no admin key to sign /flush with; name one with --key-id")
    elif key_id not in keys.secrets:
        raise ConfigError(f"key id {key_id!r} is not in {cfg.auth.secret_file}")
    try:
        with KVClient(url, Signer(key_id, keys.secrets[key_id]), cafile=cafile) as client:
            answer = client.flush()
    except KVClientError as exc:
        raise _Failed(f"{url}: POST /flush answered {exc.status} {exc.code}: {exc.message}") from None
    except (KVConnectionError, KVProtocolError) as exc:
        raise _Failed(str(exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
        raise _Failed(f"{url}: POST /flush failed: {reason}") from None
    except ValueError as exc:  # not a URL, a CA file that cannot be loaded: the message names which
        raise ConfigError(str(exc)) from None
    return int(answer.get("flushed", 0)) if isinstance(answer, dict) else 0


def _backup(args: argparse.Namespace) -> int:
    from kvtornado import backup

    if args.url is None and (args.key_id is not None or args.cafile is not None):
        raise ConfigError("--key-id and --cafile go with --url (the server to flush first)")
    cfg = _config(args.config)
    _sqlite_only(cfg, "backup", "pg_dump")
    from kvtornado.locks import lock_path
    from kvtornado.server import nonce_journal_path

    journals = [nonce_journal_path(cfg, exercise) for exercise in (2, 4)]  # beside the keys file, the database
    protect = (cfg.auth.secret_file, *journals, *map(lock_path, journals))
    backup.check_target(cfg.storage.path, args.out, protect=protect)  # before a flush is asked for
    flushed = None if args.url is None else _flush(cfg, args.url, args.key_id, args.cafile)
    copied = backup.backup(cfg.storage.path, args.out, protect=protect)
    after = "" if flushed is None else f" after {args.url} flushed {flushed}"
    print(f"backed up {cfg.storage.path} to {args.out}: {copied.rows} rows{after}", file=sys.stderr)
    return EXIT_OK


def _restore(args: argparse.Namespace) -> int:
    from kvtornado import backup

    cfg = _config(args.config)
    _sqlite_only(cfg, "restore", "pg_restore or psql")
    copied = backup.restore(args.source, cfg.storage.path, synchronous=cfg.storage.synchronous)
    print(f"restored {args.source} to {cfg.storage.path}: {copied.rows} rows; new versions start above "
          f"{copied.version_hwm}", file=sys.stderr)
    if cfg.cache.backend == "redis":
        print("cache.backend is redis: empty its database (FLUSHDB) before starting the servers, or they serve "
              "what it still holds", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """``kvtornado COMMAND ...``; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from kvtornado.server import main as serve

        return serve(argv[1:], exercise=4, default_config=DEFAULT_CONFIG, prog=f"{PROG} serve")
    if argv[:1] == ["client"]:
        from kvtornado.client import cli

        return cli(argv[1:], prog=f"{PROG} client", default_config=DEFAULT_CONFIG)
    args = _parser().parse_args(argv)
    run = {"keys": _keys_add, "backup": _backup, "restore": _restore}[args.command]
    try:
        return run(args)
    except ConfigError as exc:  # includes backup.Refused
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, _Failed) as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
