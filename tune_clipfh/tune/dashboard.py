"""``tune-clipfh dashboard EXPERIMENT``: optuna-dashboard on a search's study, served on
127.0.0.1 only (the dashboard can edit the study and has no login, so it is never offered to
the network; a remote machine's is reached through an SSH tunnel)."""

from __future__ import annotations

from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..errors import UserError
from ..extras import require
from .defaults import STUDY_FILE

HOST = "127.0.0.1"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:
        pass  # one line per request would bury the address printed at the start


def dashboard_server(experiment: str | Path, port: int) -> tuple[WSGIServer, str]:
    """A server of the experiment's study, bound but not yet serving, and its address;
    ``port`` 0 takes a free one."""
    study = Path(experiment) / STUDY_FILE
    if not study.is_file():
        raise UserError(f"{experiment}: no {STUDY_FILE} here (the dashboard shows a search's "
                        f"study; give a search experiment folder)")
    app = require("dashboard").wsgi(f"sqlite:///{study.resolve()}")
    try:
        server = make_server(HOST, port, app, handler_class=_QuietHandler)
    except OSError as exc:
        raise UserError(f"--port {port}: cannot listen on {HOST} ({exc.strerror}); give "
                        f"another port, or 0 for a free one") from None
    return server, f"http://{HOST}:{server.server_port}/"
