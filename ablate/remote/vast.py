"""A Vast.ai instance through the official ``vastai`` package: its SSH address, and why it does not answer.

    VAST_API_KEY=... ablate remote vast 1234   # prints VAST_HOST=... VAST_PORT=... and the instance's state

The API key comes from ``VAST_API_KEY`` (or the ``api_key`` argument) and never
appears in a message, log or file. The API's address is ``VAST_URL`` when set,
the variable the ``vastai`` CLI itself reads (the package reads it only once, at
import, so it is passed here as ``server_url`` on every call).

Follows vastai 1.9.1: ``vastai.api.instances.show_instance`` (GET
``/api/v0/instances/ID/?owner=me``, answer ``{"instances": {...}}``) and the SSH
address rule of its ``vastai ssh-url`` command (the proxy ``ssh_host`` and
``ssh_port``, one higher for a Jupyter image; the direct ``public_ipaddr`` and
``ports["22/tcp"]`` when there is no proxy). tests/test_remote_fleet.py replays
answers of that shape.
"""

from __future__ import annotations

import os

from ablate.errors import BadInput

DEFAULT_URL = "https://console.vast.ai"
STOPPED = ("exited", "stopped", "offline")  # the provider took the box away; it will not answer until restarted
# actual_status -> what it means for a box that does not answer over SSH
MEANING = {
    "running": "running (so the box itself is not answering: its network or sshd)",
    "loading": "loading (starting, or pulling its image)",
    "created": "created (not started yet)",
    "exited": "exited (stopped or outbid)",
    "stopped": "stopped",
    "offline": "offline (its host machine lost contact with Vast)",
}


def _plain(text, limit: int = 160) -> str:
    """An API string made safe to print on one line."""
    return "".join(c if c.isprintable() else " " for c in str(text))[:limit].strip()


def _check_id(instance_id) -> int:
    try:
        value = int(str(instance_id).strip())
    except ValueError:
        value = 0
    if value <= 0:
        raise BadInput(f"a Vast instance id is a positive number, got {_plain(instance_id, 40)!r}")
    return value


def api_url(url: str | None = None) -> str:
    return (url or os.environ.get("VAST_URL") or DEFAULT_URL).rstrip("/")


def instance(instance_id, api_key: str | None = None, url: str | None = None, timeout: float = 10.0) -> dict:
    """The instance's row as the API returns it; BadInput (one line, never the key) when it cannot be had."""
    try:
        import requests
        from vastai.api.client import VastClient
        from vastai.api.instances import show_instance
    except ImportError:
        raise BadInput("--vast-instance needs the vastai package: pip install 'ablate[vast]'") from None

    number = _check_id(instance_id)
    key = api_key or os.environ.get("VAST_API_KEY")
    if not key:
        raise BadInput("no Vast API key: set VAST_API_KEY (console.vast.ai, Account, API Keys)")
    server = api_url(url)
    # One retry at most: a status table or a watcher must not hang on the API.
    client = VastClient(api_key=key, server_url=server, retry=2, timeout=timeout)
    try:
        row = show_instance(client, number)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        if code in (401, 403):
            raise BadInput(f"the Vast API at {server} refused the API key (HTTP {code}); check VAST_API_KEY") from None
        if code == 404:
            raise BadInput(f"Vast has no instance {number} on this account (HTTP 404)") from None
        raise BadInput(f"the Vast API at {server} answered HTTP {code} for instance {number}") from None
    except requests.Timeout:
        raise BadInput(f"the Vast API at {server} did not answer within {timeout:g}s") from None
    except requests.ConnectionError:
        raise BadInput(f"cannot reach the Vast API at {server} (connection failed)") from None
    except requests.RequestException as exc:
        raise BadInput(f"cannot ask the Vast API at {server}: {type(exc).__name__}") from None
    except (KeyError, TypeError, ValueError, AttributeError):  # a body without the documented fields
        raise BadInput(f"the Vast API at {server} answered instance {number} with something that is not "
                       "an instance") from None
    if isinstance(row, list):  # older API versions answered a list
        row = row[0] if row else None
    if not isinstance(row, dict):
        raise BadInput(f"Vast has no instance {number} on this account")
    return row


def _port(value) -> int | None:
    try:
        port = int(value)
    except (TypeError, ValueError):
        return None
    return port if 1 <= port <= 65535 else None


def _host(value) -> str | None:
    host = value if isinstance(value, str) else ""
    return host if host and all(c.isalnum() or c in ".-:" for c in host) else None


def address_of(row: dict) -> tuple[str, int] | None:
    """``(host, port)`` of the instance's SSH, or None while it has none (vastai 1.9.1's ``ssh-url`` rule)."""
    host, port = _host(row.get("ssh_host")), _port(row.get("ssh_port"))
    if host and port:
        jupyter = "jupyter" in str(row.get("image_runtype") or "")
        return host, port + 1 if jupyter and port < 65535 else port
    direct = (row.get("ports") or {}).get("22/tcp") if isinstance(row.get("ports"), dict) else None
    if isinstance(direct, list) and direct and isinstance(direct[0], dict):
        host, port = _host(row.get("public_ipaddr")), _port(direct[0].get("HostPort"))
        if host and port:
            return host, port
    return None


def ssh_address(instance_id, api_key: str | None = None, url: str | None = None) -> tuple[str, int]:
    """Where to SSH into the instance, as Vast's Connect button shows it: ``(host, port)``; BadInput otherwise."""
    row = instance(instance_id, api_key, url)
    address = address_of(row)
    if address is None:
        raise BadInput(f"Vast reports no SSH address for instance {_check_id(instance_id)} yet "
                       f"({state_of(row)}); wait until it is running")
    return address


def state_of(row: dict) -> str:
    """The instance's ``actual_status`` as one short word (``unknown`` when Vast gives none)."""
    status = row.get("actual_status")
    return _plain(status, 20) if isinstance(status, str) and status.strip() else "unknown"


def verdict(instance_id, row: dict) -> str:
    status = state_of(row)
    line = f"Vast says instance {_check_id(instance_id)} is {MEANING.get(status, status)}"
    intended = row.get("intended_status")
    if status in ("exited", "stopped") and isinstance(intended, str) and intended not in ("", status):
        # exited while meant to run: outbid or the host's doing; meant to be stopped: someone asked for it
        line += f", meant to be {_plain(intended, 20)}"
    message = _plain(row.get("status_msg") or "", 120)
    return line + (f"; status: {message}" if message else "")


def triage(instance_id, api_key: str | None = None, url: str | None = None) -> str:
    """One line for a box that does not answer: what Vast says about its instance. Never raises BadInput.

    ``"Vast says instance 1234 is exited (stopped or outbid)"``; when the API cannot tell, the line says why.
    """
    try:
        return verdict(instance_id, instance(instance_id, api_key, url))
    except BadInput as exc:
        return f"Vast could not tell why: {exc}"
