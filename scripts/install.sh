#!/usr/bin/env bash
# Install the project into .venv (created with python3 >= 3.11 if missing). Idempotent:
# a second run only checks that everything is in place. Quiet; errors still show.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pip_install.sh
source scripts/pip_install.sh

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "install.sh: $PYTHON is missing or older than 3.11 (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    echo "install.sh: creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi

# The core install: node, worker and demo (ONNX Runtime inference). Training adds the
# [train] extra (torch==2.13.0, pinned: the machine's pip configuration finds the CPU wheel),
# the Triton backend the [triton] extra; scripts/test.sh installs both.
pip_install -e .
# An install whose command does not start is a failed install: show why.
if ! version="$(.venv/bin/triage-node version 2>&1)"; then
    echo "$version" >&2
    echo "install.sh: installed, but 'triage-node version' fails (above)" >&2
    exit 1
fi
echo "install.sh: ok, triage-node $version"
