#!/usr/bin/env bash
# Long fuzz run of the node's three doors (InstanceStore, C-STORE SCP, STOW-RS) with
# hypothesis, random seeds: tests/test_hostile_fuzz.py with many examples.
#
#   scripts/fuzz.sh [EXAMPLES]        # default 5000 examples per door
#
# CI runs the same tests with 60 derandomised examples. A failure prints the smallest
# mutated file hypothesis found; add it to tests/hostile_corpus.py as a named case.
set -euo pipefail
cd "$(dirname "$0")/.."
examples="${1:-5000}"
python="${PYTHON:-.venv/bin/python}"
TRIAGE_FUZZ_EXAMPLES="$examples" OMP_NUM_THREADS=1 \
  "$python" -m pytest tests/test_hostile_fuzz.py tests/test_hostile_input.py -q -p no:cacheprovider \
  -W ignore::UserWarning --timeout=0 -o addopts="" "${@:2}"
