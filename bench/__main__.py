"""``python -m bench`` (``./run.sh bench``)."""

from bench.main import main
from core.cli import run_cli

raise SystemExit(run_cli(main))
