#!/usr/bin/env bash
# Dispatcher: no hyperparameters here (they live in configs/). The first call creates .venv.
set -euo pipefail
# Paths typed on the command line (--config, validate FILE --test-dir DIR) are taken from here.
export ROBUST_PIPELINE_CWD="$PWD"
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
PY="$VENV/bin/python"

ensure_venv() {
  # Rebuild when requirements.txt or requirements-nodeps.txt changes (their hash is stamped into the venv).
  local want have=""
  want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
  [ -f "$VENV/.requirements.sha256" ] && have=$(cat "$VENV/.requirements.sha256")
  if [ ! -x "$PY" ] || [ "$want" != "$have" ]; then
    echo "setting up $VENV from requirements.txt (first run only, ~2 min)..." >&2
    [ -x "$PY" ] || python3 -m venv "$VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
    "$PY" -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt >&2
    echo "$want" > "$VENV/.requirements.sha256"
  fi
}

usage() {
  cat <<'USAGE'
usage: ./run.sh COMMAND [args]
  train    [--config FILE] [key=value ...] [launch flags]   fine-tune (checkpoints + W&B); every GPU by default
  submit   [--config FILE] [key=value ...] [launch flags]   GCM + ensemble + TTA -> submissions/
  evaluate [--config FILE] [key=value ...] [launch flags]   local leaderboard (clean/corruptions/attacks)
  make-testset [--config FILE] [key=value ...]                  a Phase-I-like test set (clean/corrupted/transfer/stacked)
  ablate   [--config FILE] [key=value ...]                      what each part of the submission stack buys
  average  [--config FILE] [key=value ...]                      one checkpoint from several: last k of a run, model soups
  validate FILE (--test-dir DIR | --config FILE) [--num-classes N]  check a submission file
  export   [--config FILE] [key=value ...]                      Phase II files (.onnx, .zip) + .pt2 + budget report
  check-submission FILE [--image-size N] [--config FILE] [key=value ...]  the organizers' checks of a Phase II file
  check-data [--config FILE] [--full] [key=value ...]           check the data a config names (labels, classes, images)
  demo-data [--out DIR]                                         generate the offline demo data set
  wandb-sync [FOLDER ...]                                       upload offline W&B runs (default: runs/); needs .venv/bin/wandb login once
  bench                                                         performance figures
  test     [pytest args]                                        the whole test suite
./run.sh COMMAND --help shows a command's own options (train/submit/evaluate: also the launch flags).
USAGE
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  train)     ensure_venv; exec "$PY" -m launch train.main "$@" ;;
  submit)    ensure_venv; exec "$PY" -m launch infer.submit "$@" ;;
  evaluate)  ensure_venv; exec "$PY" -m launch robust.evaluate "$@" ;;
  make-testset) ensure_venv; exec "$PY" -m robust.testset "$@" ;;
  ablate)    ensure_venv; exec "$PY" -m robust.ablation "$@" ;;
  validate)  ensure_venv; exec "$PY" -m infer.validate "$@" ;;
  export)    ensure_venv; exec "$PY" -m phase2.export "$@" ;;
  check-submission) ensure_venv; exec "$PY" -m phase2.check "$@" ;;
  check-data) ensure_venv; exec "$PY" -m train.check_data "$@" ;;
  average)   ensure_venv; exec "$PY" -m train.average "$@" ;;
  demo-data) ensure_venv; exec "$PY" -m train.demo_data "$@" ;;
  wandb-sync) ensure_venv; exec "$PY" -m core.wandb_sync "$@" ;;
  bench)     ensure_venv; exec "$PY" -m bench "$@" ;;
  test)      ensure_venv
             # lint first: a new violation fails the suite (and CI) in seconds
             "$PY" -m ruff check --quiet . && "$PY" -m ruff format --check --quiet . || {
               echo "error: ruff found problems (see above); '.venv/bin/ruff check --fix . && .venv/bin/ruff format .' fixes most" >&2; exit 1; }
             HF_HUB_OFFLINE=1 WANDB_MODE=disabled exec "$PY" -m pytest tests "$@" ;;
  -h|--help|help|"") usage; [ -n "$cmd" ] ;;
  *) echo "error: unknown command '$cmd'" >&2; usage >&2; exit 2 ;;
esac
