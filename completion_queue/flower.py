"""``cq flower``: the real Flower (``celery flower``) for our app, with basic auth from settings."""

from __future__ import annotations

import os
import sys

from completion_queue.celery_app import resolve_broker_url
from completion_queue.errors import ConfigError
from completion_queue.extras import require_extra
from completion_queue.settings import Settings, is_loopback

#: The importable app Flower is started with (see completion_queue/flower_app.py).
FLOWER_APP = "completion_queue.flower_app"

#: Flower saves its persistent state this often (ms), so a crash loses at most this much.
STATE_SAVE_INTERVAL_MS = 60_000

#: The tasks page's columns unless ``FLOWER_TASKS_COLUMNS`` says otherwise. ``kwargs`` is
#: what a job is (model, prompt head, max_new_tokens, tenant: see ``send_jobs``); Flower's
#: default columns leave it out, and every job's name is ``cq.generate``.
TASKS_COLUMNS = "uuid,state,kwargs,result,received,started,runtime,worker"


def check_auth(settings: Settings) -> None:
    """Refuse to open Flower beyond loopback without basic auth; check the auth's shape."""
    auth = settings.flower_basic_auth
    if auth:
        for pair in auth.split(","):
            user, _, password = pair.partition(":")
            if not user or not password:
                raise ConfigError(
                    "flower_basic_auth must be user:password[,user:password], "
                    "got an entry without a user or a password"
                )
    elif not is_loopback(settings.flower_address):
        raise ConfigError(
            f"flower_address {settings.flower_address!r} is not loopback: "
            "set CQ_FLOWER_BASIC_AUTH=user:password to open Flower beyond this machine"
        )


def flower_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """Return the argv and environment that run Flower for ``settings``.

    Secrets travel in the environment, not in argv (which ``ps`` shows).
    """
    check_auth(settings)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "--app",
        FLOWER_APP,
        "flower",
        f"--address={settings.flower_address}",
        f"--port={settings.flower_port}",
    ]
    env = {
        "FLOWER_TASKS_COLUMNS": TASKS_COLUMNS,
        **os.environ,
        "CQ_BROKER_URL": resolve_broker_url(settings),
    }
    if settings.flower_basic_auth:
        env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    if settings.flower_db is not None:
        settings.flower_db.parent.mkdir(parents=True, exist_ok=True)
        argv += [
            "--persistent=True",
            f"--db={settings.flower_db}",
            f"--state_save_interval={STATE_SAVE_INTERVAL_MS}",
        ]
    return argv, env


def run_flower(settings: Settings) -> None:
    """Replace this process with Flower (signals reach Flower directly)."""
    require_extra("monitor", "cq flower")
    argv, env = flower_command(settings)
    os.execvpe(argv[0], argv, env)
