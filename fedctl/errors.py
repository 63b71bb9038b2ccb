"""Errors of the CLI: printed as ``fedctl: error: ...`` with an exit code, never a traceback.

Exit codes: 1 for a failure (the coordinator refused, could not be reached, a device
failed), 2 for a usage error (a bad flag, task file, config file or ``--app``), 130 for
Ctrl-C.

:func:`cannot_reach` is the one wording of "the coordinator could not be reached", for every
command (admin calls, ``task launch``, ``agent run``).
"""

from __future__ import annotations


class CliError(Exception):
    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def cannot_reach(target: str, detail: str = "", *, tls: bool = False,
                 client_cert: bool = False) -> str:
    """``cannot reach the coordinator at HOST:PORT (detail): hints``: what to check, with
    the TLS side to look at, since a TLS mismatch looks like an unreachable server to gRPC."""
    hint = ": check that a coordinator (`fedctl coordinator serve`) runs at that address"
    if not tls:
        hint += "; if it serves TLS, give --ca FILE"
    else:
        hint += ("; check --ca (it must have signed the coordinator's certificate), that the "
                 "address is a name in that certificate, and that the coordinator serves TLS"
                 + ("" if client_cert else " (and whether it requires a client --cert/--key)"))
    return (f"cannot reach the coordinator at {target}" + (f" ({detail})" if detail else "")
            + hint)


def database_hint(url: str) -> str:
    """What to install for a database URL whose driver is missing ("" when none applies)."""
    scheme = url.partition(":")[0].lower()
    if scheme.startswith("postgresql") or scheme.startswith("postgres"):
        return ("; PostgreSQL needs the psycopg driver: pip install 'fedcoord[postgres]' "
                "(in a checkout: pip install -e '.[postgres]'), or pip install 'psycopg[binary]'")
    return ""
