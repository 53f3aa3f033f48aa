"""The web console for PBX admins (``/console``): agents, browser calls, call records,
dashboard. Built on the admin API (:mod:`pipeswitch.pipelines.admin_api`) and the
Prometheus numbers of ``/metrics``; :func:`pipeswitch.pipelines.console.app.mount_console`
mounts it on a started server."""
