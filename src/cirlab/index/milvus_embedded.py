"""A throwaway Milvus server on this machine, for the Milvus backend's tests and benchmarks and for trying
that backend without a Milvus deployment.

`embedded_milvus` runs the standalone server of the `milvus` package (extra `cirlab[milvus]`) as a child
process with its data and logs under a given folder, on free ports, so several can run side by side, and
stops it on exit. A production deployment runs its own Milvus server and gives its URI to the index instead.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 180


def free_port() -> int:
    """A TCP port nobody listens on now, on the loopback interface."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_healthy(server: Any, logs: Path) -> None:
    # The package's own wait never notices a server that died at start; this one fails at once.
    health = f"http://127.0.0.1:{server.webservice_port}/healthz"
    loopback = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # an HTTP proxy must not answer
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.server_proc.poll() is not None:
            raise RuntimeError(f"embedded Milvus exited with code {server.server_proc.returncode}; logs in {logs}")
        try:
            with loopback.open(health, timeout=1) as response:
                if b"OK" in response.read():
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"embedded Milvus not healthy after {START_TIMEOUT_S} s; logs in {logs}")


def _link_shared_binaries(base: Path, binaries: Path) -> None:
    """Make base/bin the server binaries unpacked once into `binaries`: unpacking takes 5-20 s of CPU."""
    import milvus

    binaries.mkdir(parents=True, exist_ok=True)
    with open(binaries / "unpack.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process unpacks, processes beside it wait, later ones reuse
        milvus._initialize_data_files(str(binaries))  # what `start` runs; it skips files already unpacked
    link = base / "bin"
    if link.is_symlink():  # left by an earlier server in the same base folder
        link.unlink()
    link.symlink_to((binaries / "bin").resolve(), target_is_directory=True)


@contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the child processes started inside; restore it afterwards."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@contextmanager
def embedded_milvus(base: Path, binaries: Path | None = None) -> Iterator[str]:
    """Start an embedded Milvus server with its data and logs under `base`, wait until it is healthy, yield
    its URI (`http://127.0.0.1:PORT`) and stop it on exit. With `binaries`, the server binaries (250 MB) are
    unpacked there once and shared by every server given that folder; without, into base/bin, removed on
    exit. The data and logs stay under `base`."""
    from milvus import MilvusServer

    base = Path(base).resolve()
    base.mkdir(parents=True, exist_ok=True)
    if binaries is not None:
        _link_shared_binaries(base, Path(binaries))
    # Every port a free one, so that servers running side by side never collide. The embedded etcd's ports
    # are not settings of the package: they go in an etcd config file the server reads.
    etcd_client, etcd_peer = free_port(), free_port()
    etcd_config = base / "embed_etcd.yaml"
    etcd_config.write_text(f"listen-client-urls: http://127.0.0.1:{etcd_client}\n"
                           f"advertise-client-urls: http://127.0.0.1:{etcd_client}\n"
                           f"listen-peer-urls: http://127.0.0.1:{etcd_peer}\n"
                           f"initial-advertise-peer-urls: http://127.0.0.1:{etcd_peer}\n"
                           f"initial-cluster: default=http://127.0.0.1:{etcd_peer}\n")
    server = MilvusServer(wait_for_started=False)
    ports = {key: free_port() for key in server.config_keys if key.endswith("_port")}
    server.config.update(**ports | {"etcd_port": etcd_client})
    server.webservice_port = free_port()  # the health endpoint; `start` keeps it when it is free
    server.set_base_dir(str(base))
    try:
        with _environment("ETCD_CONFIG_PATH", str(etcd_config)):  # read by the server process as it starts
            server.start()
        _wait_until_healthy(server, base / "logs")
        yield f"http://127.0.0.1:{server.listen_port}"
    finally:
        server.stop()
        if not (base / "bin").is_symlink():
            shutil.rmtree(base / "bin", ignore_errors=True)
