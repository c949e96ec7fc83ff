"""The serving API key: made on the first serve, kept mode 0600 in the workspace, compared in constant time."""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from ..errors import WorkbenchError
from ..store import private_dir

KEY_PREFIX = "wb-"


def key_path(home: str | Path) -> Path:
    """Where the workspace's serving key lives: <home>/serve/api_key."""
    return Path(home) / "serve" / "api_key"


def write_key_file(path: Path, key: str) -> None:
    """Write `key` readable by its owner only (0600), atomically; the file never exists with a wider mode."""
    private_dir(path.parent)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (key + "\n").encode())
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_api_key(home: str | Path) -> tuple[str, bool]:
    """The workspace's key and whether it was made just now (then the caller prints it, once)."""
    path = key_path(home)
    if path.is_file():
        return read_key_file(path), False
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    write_key_file(path, key)
    return key, True


def read_key_file(path: str | Path) -> str:
    """A key from a file (its first line); refused when missing, empty, or readable by others."""
    p = Path(path)
    if not p.is_file():
        raise WorkbenchError(f"API key file {str(p)!r} not found: give an existing file with --api-key-file, "
                             "or leave the option out to use the workspace key")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise WorkbenchError(f"API key file {str(p)!r} is readable by other users (mode {mode:o}): "
                             f"run `chmod 600 {p}`")
    lines = p.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    key = lines[0].strip() if lines else ""
    if len(key) < 16:
        raise WorkbenchError(f"API key file {str(p)!r} holds no key of at least 16 characters: "
                             "write one (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return key


def keys_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison (hmac.compare_digest): the time taken does not reveal how much matched."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def mask(key: str) -> str:
    """The key as it may be shown again: its prefix and last 4 characters."""
    return key[:3] + "..." + key[-4:] if len(key) > 10 else "****"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and 'localhost'; anything else (0.0.0.0 included) reaches beyond this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
