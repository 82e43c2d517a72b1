"""The Airflow plugin (registered through the provider info): the AI Center pages and their nav entry.

Workers load every provider's plugins too (for macros), so this module stays light: the
pages' FastAPI app, with the api-server's security imports behind it, is built on its first
request in the api-server (:class:`LazyApp`), never in a task.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from airflow.plugins_manager import AirflowPlugin

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

URL_PREFIX = "/aicenter"


class LazyApp:
    """An ASGI app that builds the AI Center FastAPI app when the api-server first calls it."""

    def __init__(self) -> None:
        self._app: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            from airflow_aicenter.plugins.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class AICenterPlugin(AirflowPlugin):
    """``/aicenter`` in the api-server, and "ML Packages" in the Airflow UI's navigation."""

    name = "aicenter"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "AI Center"}]  # noqa: RUF012 (Airflow's API)
    external_views = [  # noqa: RUF012 (Airflow's API)
        {
            "name": "ML Packages",
            # Relative, no leading slash: the UI resolves it against its own base URL and shows it in a frame.
            "href": "aicenter/",
            "url_route": "ml-packages",
            "destination": "nav",
            "nav_top_level": True,
            "icon": "aicenter/static/icon.svg",
        }
    ]
