"""The launcher: how ``train``, ``submit`` and ``evaluate`` start (:mod:`launch.plan` decides the
processes, devices and precision; :mod:`launch.start` checks, starts and supervises them)."""
