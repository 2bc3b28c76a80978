"""Bulk jobs (``POST /jobs``, modelled on AWS IoT Jobs): one action on a set of twins, paced and tracked.

A job is a target (a fleet-search filter, :mod:`metertwin.fleet.search`, or a list of meters),
an action (a command of any kind or a desired-state patch through :mod:`metertwin.twin.commands`,
DR preferences, a topology patch through :mod:`metertwin.fleet.topology`, or an upgrade handed to
the upgrade manager), and a rollout (``rate_per_s``, ``max_in_flight``, an abort rule, a timeout
per twin). Each twin's execution is queued, in_progress, succeeded, failed, rejected, timed_out or
cancelled, with a reason. See docs/jobs.md.

Modules:

* :mod:`~metertwin.jobs.spec` — the request, validated (errors name field and value);
* :mod:`~metertwin.jobs.service` — create (target snapshot), the slice runner, pause/resume/cancel,
  status and executions (the interface other capabilities use, e.g. a rule whose action is a job);
* :mod:`~metertwin.jobs.actions` — one twin's action and reading back command outcomes;
* :mod:`~metertwin.jobs.upgrade` — the hand-over of an upgrade to the upgrade manager;
* :mod:`~metertwin.jobs.scripts` — the Lua scripts (one job's keys each);
* :mod:`~metertwin.jobs.keys` — Redis keys (hash tag ``{job:<id>}`` per job);
* :mod:`~metertwin.jobs.cli` — ``python -m metertwin.jobs``.
"""
