"""``python -m launch MODULE [args]``: what ``./run.sh train|submit|evaluate`` runs (:mod:`launch.start`)."""

from core.cli import run_cli
from launch.start import main

raise SystemExit(run_cli(main))
