#!/usr/bin/env bash
# Packs builds of other revisions' kernels and sources beside tests/gpu/pack.sh's baseline,
# for an A/B of changes kept off main (a merge and its revert) in one machine session. On
# this machine, from the repository root, with a clean working tree:
#
#   bash tests/gpu/pack.sh                                   # the baseline, once
#   bash tests/gpu/pack_revs.sh "TEST ..." NAME=REV ...      e.g. "cuda_lora" bsm=8c4dbbb
#
# For each NAME=REV: kernels/, src/ and tests/ but tests/gpu/ (these scripts, running) as
# at REV (a change's own tests come with it; the rest as now), then
# tests/gpu/pack_variant.sh NAME TEST... (.device/NAME/bench and the tests). They are
# restored to HEAD at the end, also when a build fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
paths=(kernels src tests ':!tests/gpu')
[ $# -ge 2 ] || { sed -n 2,12p "$0"; exit 2; }
read -ra tests <<<"$1"
shift
if [ -n "$(git status --porcelain -- "${paths[@]}")" ]; then
  echo "error: kernels/, src/ or tests/ has uncommitted changes; commit or stash them first" >&2
  exit 1
fi
restore() { git restore --source=HEAD --staged --worktree -- "${paths[@]}" && git clean -fdq -- "${paths[@]}"; }
trap restore EXIT
for spec in "$@"; do
  name=${spec%%=*} rev=${spec#*=}
  restore  # files an earlier REV had and HEAD has not go too
  git restore --source="$rev" --worktree -- "${paths[@]}"
  echo "== $name: kernels/, src/ and tests/ of $(git log --oneline -1 "$rev")"
  bash tests/gpu/pack_variant.sh "$name" ${tests[@]+"${tests[@]}"}
done
