#!/usr/bin/env bash
# Install what the tests need (Debian packages, the project, the test extra and the
# Triton wheel) and run pytest. Arguments go to pytest; its exit status is this script's,
# and "no tests collected" (pytest's 5) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/pip_install.sh
source scripts/pip_install.sh

APT_PACKAGES=(postgresql redis-server orthanc orthanc-dicomweb dcmtk dicom3tools chromium prometheus nginx docker-compose)
SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive

missing=()
for package in "${APT_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "test.sh: apt packages missing: ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
fi
# Always run install (a no-op when everything is present): it also repairs half-installs.
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null

bash scripts/install.sh
pip_install -e ".[test,train,triton]"
# The Triton server binary for the "triton" backend tests. --no-deps: the wheel's Python
# API pins numpy<2, which would downgrade NumPy under the pylibjpeg codecs; only its
# tritonserver binary and Python-backend stub are used (worker/inference/triton_server.py).
if ! .venv/bin/python -c 'import importlib.metadata as m; assert m.version("nvidia-pytriton") == "0.7.0"' 2>/dev/null; then
    pip_install --no-deps "nvidia-pytriton==0.7.0"
fi
# The OpenID provider the sign-in tests log in to (tests/oidc: oidc-provider, pinned in its
# package-lock.json). Installed again only when the lock file is newer than the install.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    "${SUDO[@]}" apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -d tests/oidc/node_modules/oidc-provider ] \
    || [ tests/oidc/package-lock.json -nt tests/oidc/node_modules/.package-lock.json ]; then
    npm ci --prefix tests/oidc --no-audit --no-fund --loglevel=error >/dev/null
fi

set +e
.venv/bin/pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
