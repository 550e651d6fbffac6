"""Start the remote cache servers of cache/ (nginx WebDAV, the distribution registry) for tests
and benchmarks: from the shipped config files, on a free loopback port, in a temp directory,
stopped (and the directory removed) by `stop()`.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NGINX_CONF = REPO / "cache" / "nginx" / "rfs-cache.conf"
REGISTRY_CONF = REPO / "cache" / "registry" / "config.yml"
SHIPPED_LISTEN = "listen 127.0.0.1:8080;"


class ServerMissing(Exception):
    """The server program is not installed."""


def tool(name: str) -> str:
    """The path of a server program (sbin included), or ServerMissing."""
    found = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if found is None:
        raise ServerMissing(f"{name} is not installed (scripts/setup-host.sh installs it)")
    return found


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A running cache server."""

    kind: str  # "nginx" or "registry"
    url: str  # what rfs is given: http://… or oci://…
    port: int
    root: Path  # the temp directory holding its data
    data: Path  # where objects end up (nginx: data/; registry: its storage root)
    proc: subprocess.Popen[bytes]
    log: Path

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.proc.poll() is None

    def stop(self, remove: bool = True) -> None:
        """Stop the server (and, with `remove`, delete its directory)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)


def _wait_http(server: Server, url: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers: a 404 for / is fine
        except OSError:
            time.sleep(0.05)
    log = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
    server.stop()
    raise RuntimeError(f"{server.kind} did not come up on port {server.port}:\n{log}")


def _tempdir(prefix: str) -> Path:
    # Not under pytest's tmp_path: its 0700 parents would stop nginx's workers (www-data).
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    return root


def start_nginx() -> Server:
    """nginx with cache/nginx/rfs-cache.conf, only the port changed."""
    binary = tool("nginx")
    text = NGINX_CONF.read_text()
    if SHIPPED_LISTEN not in text:
        raise RuntimeError(f"{NGINX_CONF} no longer has {SHIPPED_LISTEN!r}")
    port = free_port()
    root = _tempdir("rfs-nginx-")
    conf = root / "rfs-cache.conf"
    conf.write_text(text.replace(SHIPPED_LISTEN, f"listen 127.0.0.1:{port};"))
    for sub in ("data", "tmp"):
        (root / sub).mkdir()
        if os.geteuid() == 0:  # the workers run as www-data, as the config says
            user = pwd.getpwnam("www-data")
            os.chown(root / sub, user.pw_uid, user.pw_gid)
    log = root / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [binary, "-p", str(root), "-e", "stderr", "-c", str(conf), "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    server = Server("nginx", f"http://127.0.0.1:{port}/", port, root, root / "data", proc, log)
    _wait_http(server, f"http://127.0.0.1:{port}/")
    return server


def start_registry() -> Server:
    """docker-registry with cache/registry/config.yml, address and storage from the env."""
    binary = tool("docker-registry")
    port = free_port()
    root = _tempdir("rfs-registry-")
    env = {
        **os.environ,
        "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}",
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY": str(root / "storage"),
        "REGISTRY_LOG_LEVEL": "error",
    }
    log = root / "stderr.log"
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [binary, "serve", str(REGISTRY_CONF)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
        )
    server = Server(
        "registry", f"oci://127.0.0.1:{port}/rfs/cache", port, root, root / "storage", proc, log
    )
    _wait_http(server, f"http://127.0.0.1:{port}/v2/")
    return server
