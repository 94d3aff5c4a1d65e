#!/bin/bash
# Items 1 and 2 side by side for two commits, alternating runs in one session (docs/benchmarks.md, item 11):
#   bench/compare_commits.sh BEFORE_REV AFTER_REV [OUT_DIR]
# Each commit is checked out in a temporary worktree and run with this repository's .venv.
set -euo pipefail
before=$1; after=$2; out=${3:-/tmp/influence-bench/compare}
repo=$(cd "$(dirname "$0")/.." && pwd)
py=$repo/.venv/bin/python
mkdir -p "$out"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=error
declare -A tree
for side in before after; do
  tree[$side]=$(mktemp -d)
  git -C "$repo" worktree add -f --detach "${tree[$side]}" "${!side}" -q
done
trap 'for side in before after; do git -C "$repo" worktree remove --force "${tree[$side]}"; done' EXIT
for bench in "query --sizes 100000 --no-faiss" "featurize --quick --no-bergson"; do
  for round in 1 2 3; do
    for side in before after; do
      (cd "${tree[$side]}" && $py -m bench.$bench > "$out/${bench%% *}-$side-$round.txt" 2>&1)
    done
  done
done
grep -ho '"p50_ms_100000": [0-9.]*' "$out"/query-*.txt
tail -qn1 "$out"/featurize-*.txt
