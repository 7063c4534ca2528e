#!/usr/bin/env python3
"""Install the system packages the build and the tests need, when they are missing.

Arguments are ``command:package`` pairs: the Debian package is installed when the command is
not on PATH. Uses apt-get, directly as root or through ``sudo -n``; anywhere else it prints what
to install and fails, rather than guessing a package manager. A pair starting with ``?`` is
optional: installed when that is possible, skipped with a note when it is not.

    python scripts/system_deps.py cmake:cmake ?ccache:ccache
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence


def missing_packages(pairs: Sequence[str]) -> list[str]:
    missing = []
    for pair in pairs:
        command, _, package = pair.lstrip("?").partition(":")
        if shutil.which(command) is None:
            missing.append(package or command)
    return missing


def apt_prefix() -> list[str] | None:
    if shutil.which("apt-get") is None:
        return None
    if os.geteuid() == 0:
        return []
    if (
        shutil.which("sudo")
        and subprocess.run(["sudo", "-n", "true"], capture_output=True, check=False).returncode == 0
    ):
        return ["sudo", "-n"]
    return None


def main(argv: Sequence[str]) -> int:
    missing = missing_packages(argv)
    if not missing:
        return 0
    required = missing_packages([pair for pair in argv if not pair.startswith("?")])
    prefix = apt_prefix()
    if prefix is None or not _apt_install(prefix, missing):
        if required:
            print(
                f"error: please install these packages first: {' '.join(missing)}", file=sys.stderr
            )
            return 1
        print(f"[deps] optional, not installed: {' '.join(missing)}", file=sys.stderr)
    return 0


def _apt_install(prefix: list[str], packages: list[str]) -> bool:
    print(f"[deps] installing {' '.join(packages)}", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        if subprocess.run([*prefix, *cmd], env=env, check=False).returncode != 0:
            print(f"[deps] '{' '.join(cmd)}' failed", file=sys.stderr)
            return False
    return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
