"""Run localstripe (https://github.com/adrienverge/localstripe) on 127.0.0.1 only.

localstripe's own CLI binds ``::`` (every interface) and persists its whole store on every
write to the hard-coded file ``/tmp/localstripe.pickle`` (``Store.dump_to_disk`` and
``Store.try_load_from_disk`` in ``localstripe/resources.py``), so parallel runs would clobber
each other. This wrapper binds a free loopback port, always starts from scratch, and keeps
the pickle in the file named on the command line::

    python tests/fakes/localstripe_server.py /some/private/dir/localstripe.pickle

Once it listens it prints ``PORT <n>`` on stdout (and nothing else there); its access log
goes to stderr. Imports only localstripe and aiohttp, so any interpreter with localstripe
installed can run it.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} PICKLE_PATH", file=sys.stderr)
        return 2
    pickle_path = Path(argv[1]).resolve()
    os.chdir(pickle_path.parent)

    from aiohttp import web
    from localstripe import resources, server

    def dump_to_disk(self: Any) -> None:
        with pickle_path.open("wb") as f:
            pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

    def try_load_from_disk(self: Any) -> None:  # always from scratch
        return None

    resources.Store.dump_to_disk = dump_to_disk
    resources.Store.try_load_from_disk = try_load_from_disk

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections queue from now on, before the app accepts them
    port = sock.getsockname()[1]

    access = logging.getLogger("aiohttp.access")  # localstripe logs webhook deliveries here
    access.setLevel(logging.INFO)
    access.addHandler(logging.StreamHandler(sys.stderr))

    async def announce(_: web.Application) -> None:
        print(f"PORT {port}", flush=True)

    server.app.on_startup.append(announce)
    web.run_app(server.app, sock=sock, print=None, access_log=access, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
