"""Build the serving image from the Dockerfile, and run it as a kubelet would: Docker where an engine
answers, buildah (Debian's package; no daemon) everywhere else.

    python -m tools.image            # make image: build ast-kserve:dev
    python -m tools.image --help

Our own code because nothing covers both: the Docker SDK needs a running daemon and buildah has no
Python API. It is a thin layer over the two command lines plus what neither does:
- a stand-in for the base image where no registry answers (debootstrap of the Debian release the
  base is built on, with its Python 3.11), made only after a pull failed, labelled, and said so at
  every build that uses it;
- pip's own settings on this machine (its CA bundle, a directory of wheels holding the CPU torch)
  passed into a buildah build, so it installs what `pip install` here would.
"""

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

log = logging.getLogger("tools.image")

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
TAG = "ast-kserve:dev"
TORCH_WHEEL = re.compile(r"torch-2\.13\.0\+cpu-.*\.whl")
# The stand-in's Debian release and packages: python:3.11-slim is bookworm with Python 3.11.
STANDIN_SUITE = "bookworm"
STANDIN_PACKAGES = "python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates"
STANDIN_MIRROR = "http://deb.debian.org/debian"
STANDIN_LABEL = "io.ast-kserve.stand-in-base"


class ImageError(RuntimeError):
    """What is missing or failed, in words a user can act on."""


def base_image(dockerfile: Path = DOCKERFILE) -> str:
    """The image the Dockerfile starts FROM, so the two never disagree."""
    match = re.search(r"^FROM\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
    if match is None:
        raise ImageError(f"{dockerfile} has no FROM line")
    return match.group(1)


def fully_qualified(image: str) -> str:
    """`python:3.11-slim` as both tools store it: docker.io/library/python:3.11-slim."""
    first = image.split("/", 1)[0]
    if "/" not in image:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def quiet(command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True, **kwargs)


@dataclass
class PipSettings:
    """What pip on this machine trusts and where it finds wheels, for a build to do the same."""

    cert: Optional[Path] = None
    wheels: Optional[Path] = None

    @classmethod
    def of_this_machine(cls) -> "PipSettings":
        settings = cls()
        listing = quiet([sys.executable, "-m", "pip", "config", "list"]).stdout
        # Lines as `global.cert='/etc/ssl/certs/ca-certificates.crt'` or `:env:.find-links='/opt/wheels'`.
        for line in listing.splitlines():
            key, _, value = line.partition("=")
            name, value = key.rsplit(".", 1)[-1], value.strip("'\"")
            if name == "cert" and Path(value).is_file():
                settings.cert = Path(value)
            if name == "find-links":
                for directory in map(Path, value.split()):
                    if directory.is_dir() and any(TORCH_WHEEL.fullmatch(p.name) for p in directory.iterdir()):
                        settings.wheels = directory
        return settings


@dataclass
class Running:
    """A container in the foreground: `process` is the tool's own process, its output in `log`."""

    process: subprocess.Popen
    log: Path
    runtime: "Runtime"
    output: IO[bytes]
    container: Optional[str] = None  # buildah's working container, removed once the server has exited

    def wait(self, timeout: float) -> int:
        """The server's exit code; past `timeout` it is killed (the server itself, not only the tool's
        process: under chroot isolation it would outlive buildah and keep its ports)."""
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.runtime.signal(self, signal.SIGKILL)
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self.output.close()
            if self.container is not None:
                self.runtime.run(["rm", self.container])

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the server, as the kubelet sends it to the container's first process; its exit code."""
        self.runtime.signal(self, signal.SIGTERM)
        return self.wait(timeout)


@dataclass
class Runtime:
    """The Docker and buildah command lines, where they differ."""

    name: str
    build_volumes: dict[Path, str] = field(default_factory=dict)

    def run(self, command: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        return quiet([self.name, *command], **kwargs)

    def inspect(self, image: str) -> Optional[dict]:
        """The image's configuration (Docker's `image inspect` or buildah's), None if there is no such image."""
        command = ["image", "inspect"] if self.name == "docker" else ["inspect", "--type", "image"]
        result = self.run([*command, image])
        if result.returncode != 0:
            return None
        found = json.loads(result.stdout)
        return found[0] if isinstance(found, list) else found

    def image_config(self, image: str) -> dict:
        """The image's OCI config (entrypoint, labels, ...), where each tool's inspect puts it."""
        found = self.inspect(image) or {}
        config = found.get("Config") if self.name == "docker" else found.get("OCIv1", {}).get("config")
        return config or {}

    def labels(self, image: str) -> dict[str, str]:
        return self.image_config(image).get("Labels") or {}

    def has_image(self, image: str) -> bool:
        return self.inspect(image) is not None

    def pull(self, image: str) -> Optional[str]:
        """None when pulled, else why not."""
        result = self.run(["pull", image], timeout=600)
        return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["failed"])[-1]

    def size(self, image: str) -> str:
        if self.name == "docker":
            return f"{(self.inspect(image) or {}).get('Size', 0) / 1e9:.2f} GB"
        listing = json.loads(self.run(["images", "--json", image], check=True).stdout)
        return listing[0]["size"]

    def entrypoint(self, image: str) -> list[str]:
        """buildah run takes a command, not the image's entrypoint: read it from the image."""
        return self.image_config(image)["Entrypoint"]

    def build_command(self, tag: str, build_args: dict[str, str]) -> list[str]:
        arguments = [arg for name, value in build_args.items() for arg in ("--build-arg", f"{name}={value}")]
        if self.name == "docker":
            return ["docker", "build", "-t", tag, *arguments, str(REPO)]
        volumes = [arg for host, inside in self.build_volumes.items() for arg in ("-v", f"{host}:{inside}:ro")]
        # --layers keeps each step's result, so a rebuild after a change to predictor/ redoes only the last stage.
        return ["buildah", "bud", "--isolation", "chroot", "--network", "host", "--layers", "--pull=never", *volumes, *arguments,
                "-t", tag, "-f", str(DOCKERFILE), str(REPO)]

    def import_root(self, root: Path, image: str) -> None:
        """A directory tree as an image, with the base's PATH and command."""
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        if self.name == "docker":
            with tarred(root) as tar:
                subprocess.run(["docker", "import", "--change", f"ENV PATH={path}", "--change", 'CMD ["python3"]',
                                "--change", f"LABEL {STANDIN_LABEL}=true", "-", image], stdin=tar, check=True,
                               capture_output=True)
            return
        # buildah has no `import`: fill an empty container and commit it.
        container = self.run(["from", "scratch"], check=True).stdout.strip()
        try:
            mount = self.run(["mount", container], check=True).stdout.strip()
            copy_tree(root, Path(mount))
            self.run(["umount", container], check=True)
            self.run(["config", "--env", f"PATH={path}", "--cmd", "python3", "--label", f"{STANDIN_LABEL}=true",
                      container], check=True)
            self.run(["commit", "--quiet", container, image], check=True)
        finally:
            self.run(["rm", container])

    def start(self, image: str, model_dir: Path, http_port: int, grpc_port: int, log_path: Path,
              args: Sequence[str] = (), env: Optional[dict[str, str]] = None) -> Running:
        """The image's entrypoint as its own user (the Dockerfile's USER), the model read-only at /mnt/models."""
        environment = [arg for name, value in (env or {}).items() for arg in ("-e", f"{name}={value}")]
        server = ["--model_dir", "/mnt/models", *args]
        container = None
        if self.name == "docker":
            # In the foreground, docker run passes the signals it gets on to the container's first process.
            command = ["docker", "run", "--rm", "--sig-proxy=true", "-p", f"127.0.0.1:{http_port}:8080",
                       "-p", f"127.0.0.1:{grpc_port}:8081", "-v", f"{model_dir}:/mnt/models:ro", *environment,
                       image, *server]
        else:
            container = self.run(["from", "--pull=never", image], check=True).stdout.strip()
            # No network namespace under chroot isolation: the server listens on the host's ports.
            command = ["buildah", "run", "--isolation", "chroot", "--user", "1000:1000", "--network", "host",
                       "-v", f"{model_dir}:/mnt/models:ro", *environment, container, "--",
                       *self.entrypoint(image), *server, "--http_port", str(http_port), "--grpc_port", str(grpc_port)]
        handle = open(log_path, "wb")
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        return Running(process, log_path, self, handle, container)

    def signal(self, running: Running, number: int) -> None:
        if self.name == "docker":  # docker run passes it on to the container's first process
            running.process.send_signal(number)
            return
        # buildah run answers SIGTERM by killing its child, so the server itself is signalled: with chroot
        # isolation it is a process of this machine, the first one under buildah's that runs the entrypoint.
        server = server_process(running.process.pid)
        if server is None:
            running.process.send_signal(number)
        else:
            os.kill(server, number)


@contextlib.contextmanager
def tarred(root: Path) -> Iterator[IO[bytes]]:
    """A directory tree as a tar stream, with its owners and modes (what an image layer holds)."""
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    try:
        yield tar.stdout
    finally:
        tar.stdout.close()
        if tar.wait() != 0:
            raise ImageError(f"tar of {root} failed (exit {tar.returncode})")


def copy_tree(root: Path, destination: Path) -> None:
    with tarred(root) as tar:
        subprocess.run(["tar", "-C", str(destination), "-x"], stdin=tar, check=True)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def server_process(pid: int) -> Optional[int]:
    """The highest process under `pid` that runs Python (buildah's own helpers run buildah-chroot-*)."""
    queue = children(pid)
    while queue:
        current = queue.pop(0)
        try:
            command = (Path("/proc") / str(current) / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if os.path.basename(command).startswith(b"python"):
            return current
        queue.extend(children(current))
    return None


def find_runtime(prefer: Optional[str] = None) -> Runtime:
    """Docker when its engine answers (the client alone cannot build), else buildah."""
    reasons = []
    if prefer in (None, "docker"):
        if shutil.which("docker") is None:
            reasons.append("docker is not installed")
        elif (info := quiet(["docker", "info"])).returncode != 0:
            reasons.append(f"docker is installed but no engine answers ({(info.stderr.strip().splitlines() or ['?'])[-1]})")
        else:
            return Runtime("docker")
    if prefer in (None, "buildah"):
        if shutil.which("buildah") is not None:
            if reasons:
                log.info("Using buildah: %s", "; ".join(reasons))
            return Runtime("buildah")
        reasons.append("buildah is not installed (Debian: apt-get install buildah)")
    raise ImageError("No tool to build the image with: " + "; ".join(reasons))


def make_standin(runtime: Runtime, image: str) -> None:
    """Debian's own Python 3.11 on the base's Debian release, named as the base, for a machine no registry
    reaches. It is Debian's python3.11 in /usr/bin where the real base has its own build in /usr/local."""
    if shutil.which("debootstrap") is None:
        raise ImageError(f"{image} cannot be pulled here, and the stand-in needs debootstrap (apt-get install debootstrap)")
    with tempfile.TemporaryDirectory(prefix="ast-base-", dir="/var/tmp") as scratch:
        root = Path(scratch) / "root"
        log.info("Running debootstrap %s into %s (a minute or two)", STANDIN_SUITE, root)
        result = quiet(["debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}", STANDIN_SUITE, str(root),
                        STANDIN_MIRROR], timeout=1800)
        if result.returncode != 0:
            raise ImageError(f"debootstrap failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}")
        (root / "usr/bin/python").symlink_to("python3.11")
        # What Debian's slim images leave out too: package lists and caches, documentation.
        for leftover in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man", "usr/share/info"):
            shutil.rmtree(root / leftover, ignore_errors=True)
        runtime.import_root(root, image)


def ensure_base(runtime: Runtime, image: str) -> None:
    if runtime.has_image(image):
        if runtime.labels(image).get(STANDIN_LABEL) == "true":
            log.warning("%s here is the stand-in made with debootstrap (no registry was reachable when it was "
                        "made): fine for testing, build the image you ship where the real one can be pulled", image)
        return
    reason = runtime.pull(image)
    if reason is None:
        return
    log.warning("%s could not be pulled (%s): making a stand-in from Debian %s's packages with debootstrap. "
                "Build on a machine that reaches a registry for the image you ship.", image, reason, STANDIN_SUITE)
    make_standin(runtime, image)


def build(tag: str = TAG, runtime: Optional[Runtime] = None, torch_source: Optional[str] = None,
          settings: Optional[PipSettings] = None, variant: str = "cpu") -> Runtime:
    runtime = runtime or find_runtime()
    ensure_base(runtime, fully_qualified(base_image()))
    build_args: dict[str, str] = {}
    if variant == "cuda":  # torch from PyPI (the CUDA build) unless a source is named; no OpenVINO
        build_args["VARIANT"] = "cuda"
        torch_source = "" if torch_source is None else torch_source
    settings = settings if settings is not None else PipSettings.of_this_machine()
    if runtime.name == "buildah":
        if settings.cert is not None:
            log.info("pip here trusts %s: so does the build", settings.cert)
            runtime.build_volumes[settings.cert] = "/etc/ssl/certs/host-ca.crt"
            build_args["PIP_CERT"] = "/etc/ssl/certs/host-ca.crt"
        if settings.wheels is not None and torch_source is None:
            log.info("pip here finds torch 2.13.0+cpu in %s: the build installs it from there", settings.wheels)
            runtime.build_volumes[settings.wheels] = "/wheels"
            torch_source = "--find-links /wheels"
    elif settings.cert is not None or settings.wheels is not None:
        log.info("docker build cannot mount pip's settings here (%s); name a mirror with --torch-source if the "
                 "CPU index cannot be reached", settings)
    if torch_source is not None:
        build_args["TORCH_SOURCE"] = torch_source
    command = runtime.build_command(tag, build_args)
    log.info("Building %s: %s", tag, " ".join(command))
    started = time.monotonic()
    if subprocess.run(command).returncode != 0:
        raise ImageError(f"the build of {tag} failed (its output is above)")
    size = runtime.size(tag)
    log.info("Built %s in %.1f min: %s", tag, (time.monotonic() - started) / 60, size)
    return runtime


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tag", default=os.environ.get("IMAGE", TAG), help="the image's name (env IMAGE)")
    parser.add_argument("--runtime", choices=["docker", "buildah"], help="default: Docker if its engine answers")
    parser.add_argument("--torch-source", help='pip arguments naming where the CPU torch comes from, e.g. '
                        '"--index-url https://mirror.example/whl/cpu" (default: the Dockerfile\'s, or the wheels '
                        "directory pip here finds it in)")
    parser.add_argument("--variant", choices=["cpu", "cuda"], default=os.environ.get("VARIANT", "cpu"),
                        help="cpu (the default): CPU-only torch; cuda: PyPI's CUDA torch for GPU nodes, without "
                        "OpenVINO (env VARIANT)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        build(args.tag, find_runtime(args.runtime), args.torch_source, variant=args.variant)
    except ImageError as error:
        log.error("%s", error)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
