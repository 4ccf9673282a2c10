# Sourced by run.sh and test.sh from the repository root: create .venv (or
# $ARRAYSYNCBN_VENV) if missing (upgrading pip once, when created), and define
# pip_install, which installs into it quietly, and install_checkout, which
# installs this checkout editable.
venv="${ARRAYSYNCBN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
    fresh_venv=1
fi
pip_install() {
    # Some machines' pip configuration names index folders that do not exist;
    # drop only that warning, keep every other message.
    "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
[ -z "${fresh_venv:-}" ] || pip_install --upgrade pip

install_checkout() {
    # install_checkout SPEC, e.g. ".[test,mpi,lint]": pip install -e SPEC.
    # Both scripts install editable, so neither replaces the other's install
    # and every script imports this tree. Skipped when this SPEC was installed
    # with the same setup.cfg and pyproject.toml and the package is still an
    # editable install of this checkout (the stamp lives in the venv).
    local spec=$1 stamp="$venv/.arraysyncbn-installed" meta
    meta=$(cat setup.cfg pyproject.toml | cksum | tr -d ' ')
    if grep -qsxF "$meta $spec" "$stamp" && _editable_here; then
        return 0
    fi
    # setuptools warns on every editable install that a folder named like the
    # package may shadow it; here that folder *is* the package.
    PYTHONWARNINGS="ignore:Editable installation" pip_install -e "$spec"
    # Keep the stamps of other SPECs made with the same metadata, drop stale ones.
    { grep -sF "$meta " "$stamp" || true; echo "$meta $spec"; } >"$stamp.new"
    mv "$stamp.new" "$stamp"
}
_editable_here() {
    # Whether pip's record says arraysyncbn is installed editable from here.
    local record
    for record in "$venv"/lib/python*/site-packages/arraysyncbn-*.dist-info/direct_url.json; do
        grep -qsE '"editable": ?true' "$record" && grep -qsF "\"file://$PWD\"" "$record" && return 0
    done
    return 1
}
