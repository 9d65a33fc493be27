"""Run localstripe (a stateful fake Stripe server from PyPI) for the tests.

localstripe's own ``start()`` binds ``'::'`` (every interface) and pickles its
state to a fixed file in the system temp folder that every instance on the
machine shares. This helper starts it in a subprocess of its own way instead:
bound to 127.0.0.1 on a port the child picks (and reports, so no port race), with
its pickle file in a directory of ours, and waits until it answers:

    with StripeServer(tmp_dir) as server:
        client = stripe.StripeClient("sk_test_x", base_addresses={"api": server.url})

localstripe ignores ``Idempotency-Key``; the tests rely on that to prove the
driver does not depend on it alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
import typing as t
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

API_KEY = "sk_test_ai_metering"


class StripeServer:
    """A localstripe subprocess on 127.0.0.1; stopped (by its pid) on exit."""

    def __init__(self, state_dir: Path, *, startup_timeout: float = 20.0) -> None:
        self.pickle_path = state_dir / "localstripe.pickle"
        self.startup_timeout = startup_timeout
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> StripeServer:
        self._process = subprocess.Popen(
            [sys.executable, __file__, str(self.pickle_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._process.stdout is not None
        port = self._process.stdout.readline().strip()
        if not port.isdigit():
            self.stop()
            raise RuntimeError(f"localstripe did not start (said {port!r})")
        self.url = f"http://127.0.0.1:{port}"
        self._wait_until_ready()
        return self

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        request = urllib.request.Request(f"{self.url}/v1/customers", headers={"Authorization": f"Bearer {API_KEY}"})
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2):
                    return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"localstripe did not answer on {self.url}") from None
                time.sleep(0.1)

    def reset(self) -> None:
        """Forget every object (localstripe's own ``DELETE /_config/data``)."""
        request = urllib.request.Request(f"{self.url}/_config/data", method="DELETE")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _serve(pickle_path: str) -> None:
    """The child: patch the pickle path, bind 127.0.0.1:0, print the port, serve."""
    import pickle
    import socket

    from aiohttp import web
    from localstripe import resources
    from localstripe import server

    def dump_to_disk(self: t.Any) -> None:
        with open(pickle_path, "wb") as f:
            pickle.dump(self, f, protocol=pickle.HIGHEST_PROTOCOL)

    def try_load_from_disk(self: t.Any) -> None:
        return None

    resources.Store.dump_to_disk = dump_to_disk
    resources.Store.try_load_from_disk = try_load_from_disk
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(server.app, sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    _serve(sys.argv[1])
