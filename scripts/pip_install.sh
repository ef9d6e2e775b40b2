# Sourced by install.sh and test.sh (run from the repository root).
# pip, quiet: on failure everything it said; on success only its real warnings (not the
# "Location ... is ignored" lines some machines' extra-index settings produce). Versions
# come from constraints.txt (scripts/lock.sh), so every install gets what was tested.
pip_install() {
    local log
    log="$(mktemp)"
    if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt "$@" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    grep -v "is ignored: it is neither a file nor a directory" "$log" || true
    rm -f "$log"
}
