"""Starting or joining the Ray cluster an experiment runs on, with token authentication.

A Ray cluster started here keeps Ray's token authentication on, with a token file only its user
can read (:func:`secure_local_auth`): Ray's servers listen on every interface, and the token is
what keeps other hosts and users out. Connecting to an existing cluster (``--address``,
``RAY_ADDRESS``) uses the user's own Ray settings.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import sys
from pathlib import Path
from typing import Any

import ray

from ..errors import UserError

AUTH_MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None
"""The node address of a cluster started here. Ray 2.60 cannot keep a local cluster on
loopback: its GCS, raylet and worker gRPC servers listen on every interface whatever the node
address, and ``ray.init`` rewrites ``_node_ip_address="127.0.0.1"`` (or ``localhost``) to the
machine's outward address. Another loopback address is kept as given (on Linux all of
127.0.0.0/8 is loopback), so the servers Ray binds to the node address (the runtime-env agent)
and every address Ray advertises stay on loopback. What refuses other hosts and local users at
the wildcard listeners is the token. (Elsewhere Ray already uses 127.0.0.1 for a local
cluster.)"""


def init_ray(options: Any, **ray_kwargs: Any) -> None:
    """Connect to ``options.address`` (or ``RAY_ADDRESS``) with the user's own Ray settings, or
    start a local cluster with token authentication on and no dashboard. ``ray_kwargs`` go to
    ``ray.init`` (tests pass ``num_cpus``)."""
    if ray.is_initialized():
        return
    # Trials resolve paths before fit(); keep Ray's own chdir off too, so nothing relative breaks.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Trial logs stay in each trial's folder; the driver prints one line per epoch instead.
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False, **ray_kwargs}
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **kwargs)
        return
    secure_local_auth()
    if LOCAL_NODE_IP:
        kwargs.setdefault("_node_ip_address", LOCAL_NODE_IP)
    ray.init(**kwargs)


def auth_token_path() -> Path | None:
    """The token file Ray reads here (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``), or
    None when the token comes from ``RAY_AUTH_TOKEN``."""
    if os.environ.get(TOKEN_VAR):
        return None
    custom = os.environ.get(TOKEN_PATH_VAR)
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def secure_local_auth() -> Path | None:
    """Token authentication for a Ray cluster this process starts: on, whatever
    ``RAY_AUTH_MODE`` says, with a token file only this user can read (created here, mode 0600,
    before Ray would write one with the default umask). Returns the token file (None: the token
    is ``RAY_AUTH_TOKEN``)."""
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is not None and mode.lower() != "token":
        _stderr(f"[ray] {AUTH_MODE_VAR}={mode} ignored: a Ray cluster tune-clipfh starts always "
                f"uses token authentication")
        # Unset, Ray 2.60 turns token authentication on for a new local cluster (and refreshes
        # its configuration, which it read from the environment at import).
        del os.environ[AUTH_MODE_VAR]
    # Ray's own notice for that default says how to opt out; this project does not.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    path = auth_token_path()
    if path is None:
        return None
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))  # 256 bits, as Ray's own tokens
        elif stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
            _stderr(f"[ray] {path}: made readable by its owner only (mode 0600)")
    except OSError as exc:
        raise UserError(f"Ray authentication token {path}: {exc.strerror or exc} (it must be a "
                        f"file only you can read; set {TOKEN_PATH_VAR} to use another)") from None
    return path


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
