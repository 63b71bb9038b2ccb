"""Where fedctl finds its API token: ``--token``, then ``$FEDCOORD_TOKEN``, then the token
file (``$FEDCOORD_TOKEN_FILE`` or ``~/.config/fedcoord/token``), which must be readable by
its owner only."""

from __future__ import annotations

import os
import re
from pathlib import Path

from fedctl.errors import CliError

_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def token_file() -> Path:
    override = os.environ.get("FEDCOORD_TOKEN_FILE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "fedcoord" / "token"


def resolve_token(flag: str | None) -> str | None:
    if flag:
        return flag.strip()
    env = os.environ.get("FEDCOORD_TOKEN", "").strip()
    if env:
        return env
    path = token_file()
    if not path.exists():
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CliError(f"{path}: a token file must be readable by its owner only "
                       f"(mode {mode:o}; chmod 600 it)")
    return path.read_text().strip() or None


def save_token(secret: str, path: Path | None = None) -> Path:
    """Writes the token file with mode 0600 (created so, never readable by others)."""
    path = path or token_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)
    return path


def parse_duration(text: str, flag: str) -> int:
    """Seconds of ``30d``, ``12h``, ``90m``, ``45s`` or ``45``; ``never`` and ``0`` are 0."""
    text = text.strip().lower()
    if text in ("never", "0"):
        return 0
    m = _DURATION.match(text)
    if m is None:
        raise CliError(f"{flag} {text[:20]!r}: expected a duration such as 30d, 12h, 90m, 45s "
                       "or never", exit_code=2)
    return int(m.group(1)) * _UNIT_S[m.group(2)]
