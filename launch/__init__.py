"""The launcher: how ``train``, ``submit`` and ``evaluate`` start (:mod:`launch.start`): checks that
need no process first, then one process here or accelerate's own launcher for several."""
