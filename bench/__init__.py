"""``./run.sh bench``: performance figures as ratios measured side by side (see ``bench.main``)."""
