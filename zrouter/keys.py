"""``zrouter-keys NAME [--dir DIR] [--services a,b]``: make a CURVE key pair for a broker, a
worker or a client, and print its public key.

It writes ``DIR/NAME.key`` (the public certificate: hand it out, or copy it into a broker's
``--worker-keys`` / ``--client-keys`` directory) and ``DIR/NAME.key_secret`` (public and secret
key, mode 0600: it never leaves the machine of the process it identifies), with pyzmq's
``zmq.auth.create_certificates``. ``--services a,b`` limits what the key may do at a broker: a
worker key may only register for those services, a client key may only call them. pyzmq writes
metadata only into the secret file, while the broker reads its allow-lists from public ones,
so the line ``services = a,b`` is added to the public ``.key`` file here too (it may also be
added or changed by hand; send the broker SIGHUP to apply).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from zmq.auth import create_certificates

from zrouter.curve import SERVICES_FIELD, load_public_key, parse_services, require_curve

__all__ = ["create_key_pair", "main"]


def create_key_pair(name: str, directory: str = ".", services: Sequence[str] | None = None,
                    force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` in ``directory`` (created if missing);
    returns their paths. ``services`` (None: unlimited) goes into both files' metadata.

    Raises FileExistsError when either file exists and ``force`` is false, ValueError for a
    name that is not a plain file name or a service name with a comma."""
    if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"NAME must be a plain file name, got {name!r}")
    if services is not None and any("," in s or not s.strip() for s in services):
        raise ValueError(f"service names must be non-empty and have no commas: {list(services)!r}")
    require_curve()
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, name)
    if not force:
        for path in (f"{base}.key", f"{base}.key_secret"):
            if os.path.exists(path):
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    metadata = None if services is None else {SERVICES_FIELD: ",".join(s.strip() for s in services)}
    public_file, secret_file = create_certificates(directory, name, metadata)
    os.chmod(secret_file, 0o600)
    if metadata is not None:
        _add_metadata(public_file, f"    {SERVICES_FIELD} = {metadata[SERVICES_FIELD]}\n")
    return public_file, secret_file


def _add_metadata(path: str, line: str) -> None:
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    at = lines.index("metadata\n") + 1  # create_certificates writes an empty section
    lines.insert(at, line)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="zrouter-keys", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("name", metavar="NAME", help="file name of the pair: NAME.key and NAME.key_secret")
    p.add_argument("--dir", default=".", help="directory to write them in (default: the current one)")
    p.add_argument("--services", metavar="A,B",
                   help="limit the key to these services (a worker may only serve them, a client only call them)")
    p.add_argument("--force", action="store_true", help="replace an existing pair")
    args = p.parse_args(argv)
    services = None if args.services is None else sorted(parse_services(args.services))
    try:
        public_file, secret_file = create_key_pair(args.name, args.dir, services, args.force)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"zrouter-keys: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {public_file} (public) and {secret_file} (secret, mode 0600)"
          + ("" if services is None else f"; services: {', '.join(services) or '(none)'}"), file=sys.stderr)
    print(load_public_key(public_file).decode("ascii"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
