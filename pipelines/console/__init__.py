"""The web console for PBX admins (``/console``): agents, browser calls, call records,
dashboard. Built on the admin API (:mod:`pipeswitch.pipelines.admin_api`) and the
Prometheus numbers of ``/metrics``; see :mod:`pipeswitch.pipelines.console.app`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from pipeswitch.config.tenants import Tenant
    from pipeswitch.pipelines.app import Pipeswitch


def mount_console(ps: Pipeswitch) -> web.Application:
    """The console sub-application for a started server (tenants in PostgreSQL).

    Registers the browser calls' side channel with the call controller, so the page gets
    its call's transcript and turn latency.
    """
    from pipeswitch.pipelines.console.app import Console, console_app

    def tenants() -> list[Tenant]:
        loader = ps.tenancy.loader
        return loader.tenants() if loader is not None else []

    console = Console(ps.settings, lambda: ps.tenancy.store, lambda: ps.server, tenants)
    if ps.sessions is not None:
        ps.sessions.observer_factories.append(console.calls.observers)
    return console_app(console)
