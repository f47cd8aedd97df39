"""Controllers: pure logic that reads samples and returns decisions, one per module.

- :mod:`~migrate.control.base` — the :class:`~migrate.control.base.Controller`
  protocol, :class:`~migrate.control.base.PredictionAware`,
  :class:`~migrate.control.base.ControlContext`, the decision builders and QEMU's
  constants.
- :mod:`~migrate.control.estimate` — live estimates shared with
  :mod:`migrate.progress`: bandwidth over a window, time left, round starts.
- :mod:`~migrate.control.static` — :class:`StaticController` (``qemu-default``).
- :mod:`~migrate.control.livemig` — :class:`LivemigController`, the adaptive one.
- :mod:`~migrate.control.proxmox`, :mod:`~migrate.control.nova`,
  :mod:`~migrate.control.ovirt` — the peers' fixed schedules.

A controller never talks to QEMU: the strategy carries out its
:class:`~migrate.report.Decision` objects and emits each as an event. Operator
limits are :class:`~migrate.policy.Policy` (no import from here); named policies
and ``controller_for`` are in :mod:`migrate.presets`.
"""
