"""Container images for the local node, made without a registry: the Dockerfile's base, a pause image, ours.

- The base image ``python:3.11-slim-bookworm`` is pulled when a registry answers; otherwise it is made
  from Debian packages: ``debootstrap --variant=minbase`` with Debian's Python 3.11, pip/setuptools/wheel
  under ``/usr/local`` and ``/usr/local/bin/python{,3}``, like the official image. The root filesystem
  is kept as a tarball in the cache folder (keyed by the recipe), so a later run only imports it.
- The pause image (the sandbox every pod runs in) is ``busybox`` from ``busybox-static``, idling until
  told to stop.
- The project's image is built from the repository's Dockerfile as it is, with ``podman build
  --network host --pull=never``; this machine's pip settings and CA bundle are mounted into the build
  so that pip reaches the package index the way the host does.

podman runs with a ``containers.conf`` of our own (``CONTAINERS_CONF``): this VM refuses podman's default
``nofile`` ulimit, and nothing under ``/etc`` is changed.
"""

from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from nodeutil import NodeError, run, say

BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
PAUSE_IMAGE = "localhost/autotek-e2e/pause:1"
RECIPE_LABEL = "io.autotek.e2e.recipe"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
BASE_PACKAGES = ("ca-certificates", "netbase", "tzdata", "python3", "python3-venv", "python3-wheel-whl")

#: Run in the debootstrapped tree: the official image's layout on top of Debian's interpreter.
BASE_CHROOT_SCRIPT = r"""
set -eu
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
rm -f /usr/lib/python3*/EXTERNALLY-MANAGED
pip_wheel=$(ls /usr/share/python-wheels/pip-*.whl)
python3 "$pip_wheel/pip" install --quiet --no-index --no-cache-dir --find-links /usr/share/python-wheels \
    pip setuptools wheel
ln -sf /usr/bin/python3 /usr/local/bin/python3
ln -sf /usr/bin/python3 /usr/local/bin/python
python -m pip --version
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log /var/log/alternatives.log
find / -xdev -name __pycache__ -type d -prune -exec rm -rf {} +
"""

BASE_CHANGES = (
    "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    'CMD ["python3"]',
)

PAUSE_SCRIPT = "trap 'exit 0' TERM INT; while :; do /bin/busybox sleep 3600 & wait $!; done"

CONTAINERS_CONF = """\
# podman settings for the local node's image builds (CONTAINERS_CONF): this machine refuses the
# default nofile limit (no CAP_SYS_RESOURCE, hard limit below it).
[containers]
default_ulimits = ["nofile=16384:16384", "nproc=16384:16384"]
"""


def recipe_key() -> str:
    text = "\n".join([DEBIAN_MIRROR, SUITE, *BASE_PACKAGES, BASE_CHROOT_SCRIPT, *BASE_CHANGES])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Images:
    """Makes and caches the images; ``cache`` keeps tarballs across runs, ``work`` is scratch space."""

    def __init__(self, cache: Path, work: Path, logs: Path) -> None:
        self.cache = cache
        self.work = work
        self.logs = logs
        self.conf = cache / "containers.conf"

    # -- podman ----------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        self.cache.mkdir(parents=True, exist_ok=True)
        if not self.conf.exists() or self.conf.read_text() != CONTAINERS_CONF:
            self.conf.write_text(CONTAINERS_CONF)
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def podman(self, step: str, *args: str, timeout: float = 300, log: Path | None = None) -> str:
        proc = run(step, ["podman", *args], timeout=timeout, env=self.env(), log=log)
        return proc.stdout.decode(errors="replace") if proc.stdout is not None else ""

    def label(self, image: str, label: str) -> str | None:
        """The image's label value ('' when unlabelled), or None when podman does not have the image."""
        proc = subprocess.run(
            ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env(),
        )
        if proc.returncode != 0:
            return None
        value = proc.stdout.strip()
        return "" if value == "<no value>" else value

    # -- the base image --------------------------------------------------------------------

    def ensure_base(self) -> str:
        """``python:3.11-slim-bookworm`` in podman's store; returns how it got there."""
        key = recipe_key()
        have = self.label(BASE_IMAGE, RECIPE_LABEL)
        if have == key:
            return "already in podman's store"
        if have == "":
            return "already in podman's store (pulled)"
        tarball = self.cache / f"python-3.11-slim-bookworm-{key}.tar"
        if not tarball.exists():
            if registry_reachable():
                self.podman("base image", "pull", BASE_IMAGE, timeout=600, log=self.logs / "base-image.log")
                return "pulled"
            self._debootstrap(tarball)
            how = "made with debootstrap"
        else:
            how = f"imported from {tarball.name}"
        changes = [a for change in (*BASE_CHANGES, f"LABEL {RECIPE_LABEL}={key}") for a in ("--change", change)]
        self.podman("base image", "import", *changes, str(tarball), BASE_IMAGE, log=self.logs / "base-image.log")
        return how

    def _debootstrap(self, tarball: Path) -> None:
        log = self.logs / "base-image.log"
        self.work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="rootfs-", dir=self.work) as tmp:
            rootfs = Path(tmp) / "rootfs"
            say(f"debootstrap {SUITE} into {rootfs} (a few minutes; log {log})")
            run(
                "base image",
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(rootfs),
                    DEBIAN_MIRROR,
                ],
                timeout=1200,
                log=log,
            )
            run("base image", ["chroot", str(rootfs), "/bin/sh", "-c", BASE_CHROOT_SCRIPT], timeout=600, log=log)
            partial = tarball.with_suffix(".partial")
            run(
                "base image",
                ["tar", "--numeric-owner", "--xattrs", "-C", str(rootfs), "-cf", str(partial), "."],
                timeout=600,
                log=log,
            )
            partial.rename(tarball)
            for old in self.cache.glob("python-3.11-slim-bookworm-*.tar"):
                if old != tarball:
                    old.unlink(missing_ok=True)

    # -- the pause image -------------------------------------------------------------------

    def ensure_pause(self) -> str:
        if self.label(PAUSE_IMAGE, RECIPE_LABEL) == pause_key():
            return "already in podman's store"
        busybox = Path("/bin/busybox")
        if not busybox.exists():
            raise NodeError("pause image", "/bin/busybox is missing (package busybox-static)")
        log = self.logs / "pause-image.log"
        self.work.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pause-", dir=self.work) as tmp:
            root = Path(tmp) / "root"
            (root / "bin").mkdir(parents=True)
            # Called `busybox` on purpose: under another name it looks for an applet of that name.
            shutil.copy2(busybox, root / "bin" / "busybox")
            tar = Path(tmp) / "pause.tar"
            run("pause image", ["tar", "--numeric-owner", "-C", str(root), "-cf", str(tar), "."], timeout=60, log=log)
            changes = [
                f'ENTRYPOINT ["/bin/busybox", "sh", "-c", "{PAUSE_SCRIPT}"]',
                f"LABEL {RECIPE_LABEL}={pause_key()}",
            ]
            args = [a for change in changes for a in ("--change", change)]
            self.podman("pause image", "import", *args, str(tar), PAUSE_IMAGE, log=log)
        return "made from busybox-static"

    # -- the project's image ---------------------------------------------------------------

    def build(self, context: Path, tags: list[str], log: Path) -> None:
        """``podman build`` of ``context``'s Dockerfile, unchanged, with the host's pip settings mounted."""
        mounts: list[str] = []
        self.work.mkdir(parents=True, exist_ok=True)
        pip_conf, ca = host_pip_config(self.work / "pip.conf")
        mounts += ["-v", f"{pip_conf}:/etc/pip.conf:ro"]
        if ca is not None:
            mounts += ["-v", f"{ca}:{ca}:ro"]
        tag_args = [a for tag in tags for a in ("-t", tag)]
        self.podman(
            "image build",
            "build",
            "--network",
            "host",
            "--pull=never",
            *mounts,
            *tag_args,
            "-f",
            str(context / "Dockerfile"),
            str(context),
            timeout=1500,
            log=log,
        )

    def save(self, images: list[str], into: Path) -> None:
        """One docker-archive with every name in ``images`` (what ``ctr images import`` reads)."""
        self.podman(
            "load image",
            "save",
            "--multi-image-archive",
            "--format",
            "docker-archive",
            "-o",
            str(into),
            *images,
            timeout=300,
        )


def pause_key() -> str:
    try:
        digest = hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest()
    except OSError:
        digest = "missing"
    return hashlib.sha256(f"{PAUSE_SCRIPT}\n{digest}".encode()).hexdigest()[:16]


def registry_reachable(host: str = "registry-1.docker.io", port: int = 443, timeout: float = 3.0) -> bool:
    """Whether Docker Hub's registry accepts a TCP connection (a quick probe, no request)."""
    if os.environ.get("AUTOTEK_E2E_BASE_IMAGE", "").strip().lower() == "local":
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


#: pip settings that decide how the package index is reached; the rest (local wheel folders,
#: constraints files of this machine) has no meaning inside the build.
_PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "proxy", "cert", "client-cert", "timeout", "retries")


def host_pip_config(out: Path) -> tuple[Path, Path | None]:
    """A pip.conf with this machine's index settings (config files and ``PIP_*``); and the CA bundle it names.

    Values pip reads from its configuration files (``pip config list``) come first, ``PIP_*`` variables
    override them, as pip itself does. Index URLs that point at this machine's disk (``file:``) are left
    out: the build cannot see them.
    """
    settings: dict[str, str] = {}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
        )
        listing = proc.stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.partition(".")
        if key in _PIP_KEYS and section in ("global", "install", ":env:"):
            settings[key] = value.strip().strip("'\"")
    for key in _PIP_KEYS:
        env = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if env:
            settings[key] = env
    for key in ("index-url", "extra-index-url"):
        if key in settings:
            urls = [u for u in settings[key].split() if u.startswith(("http://", "https://"))]
            if urls:
                settings[key] = " ".join(urls)
            else:
                del settings[key]
    ca: Path | None = None
    if "cert" in settings:
        ca = Path(settings["cert"]).resolve()
        if not ca.is_file():
            raise NodeError("image build", f"pip's CA bundle {settings['cert']} does not exist")
        settings["cert"] = str(ca)
    else:
        for candidate in (os.environ.get("SSL_CERT_FILE"), "/etc/ssl/certs/ca-certificates.crt"):
            if candidate and Path(candidate).is_file():
                ca = Path(candidate).resolve()
                settings["cert"] = str(ca)
                break
    parser = configparser.ConfigParser()
    parser["global"] = settings
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        parser.write(f)
    return out, ca
