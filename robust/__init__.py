"""``./run.sh evaluate``: the local robustness leaderboard (attack specs, runner, corruptions,
results, verdict, report)."""
