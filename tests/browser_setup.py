"""Make sure a Chromium that Playwright can drive is on this machine.

Playwright's own browser download does not work here, so the browser tests drive
Debian's `chromium` package (/usr/bin/chromium). This module installs it with
apt-get when it is missing and we are root.

    python tests/browser_setup.py      # install if needed; exit 0 when usable, 1 otherwise

FOXLAB_CHROMIUM points it at another Chromium binary (default /usr/bin/chromium).

`find_chromium()` is what tests/test_browser.py uses: it returns the executable or
raises `ChromiumUnavailable` with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

CHROMIUM = os.environ.get("FOXLAB_CHROMIUM", "/usr/bin/chromium")
APT_TIMEOUT_S = 300  # apt-get update + install together; the package is ~100 MB with its deps

# What works on this machine (see the project's notes): headless, no sandbox as root, and no
# background traffic, which a closed network refuses many times a second.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


class ChromiumUnavailable(RuntimeError):
    """Chromium is missing and cannot be installed here; the message says why."""


def _usable(path: str) -> bool:
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return False
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "Chromium" in out.stdout


def _apt_install(log=print) -> None:
    if shutil.which("apt-get") is None:
        raise ChromiumUnavailable(f"{CHROMIUM} is missing and there is no apt-get to install Debian's chromium")
    if os.geteuid() != 0:
        raise ChromiumUnavailable(
            f"{CHROMIUM} is missing and we are not root: run `sudo apt-get install -y chromium` "
            "(or `sudo python tests/browser_setup.py`)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        log("browser_setup: " + " ".join(cmd))
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise ChromiumUnavailable(f"`{' '.join(cmd)}` took more than {APT_TIMEOUT_S}s") from None
        if res.returncode != 0:
            tail = (res.stdout + res.stderr).strip().splitlines()[-5:]
            raise ChromiumUnavailable(f"`{' '.join(cmd)}` failed ({res.returncode}): " + " | ".join(tail))


def find_chromium(install: bool = True, log=print) -> str:
    """Path of a working Chromium; installs Debian's package when missing (root only)."""
    if _usable(CHROMIUM):
        return CHROMIUM
    if not install:
        raise ChromiumUnavailable(f"{CHROMIUM} is missing")
    _apt_install(log)
    if not _usable(CHROMIUM):
        raise ChromiumUnavailable(f"apt-get installed chromium but {CHROMIUM} --version does not run")
    return CHROMIUM


def main() -> int:
    try:
        path = find_chromium()
    except ChromiumUnavailable as exc:
        print(f"browser_setup: Chromium unavailable: {exc}", file=sys.stderr)
        return 1
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"browser_setup: {path}: {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
