# Sourced by run.sh and test.sh from the repository root: create .venv (or
# $ARRAYSYNCBN_VENV) if missing, with an up-to-date pip, and define
# pip_install, which installs into it quietly.
venv="${ARRAYSYNCBN_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
pip_install() {
    # Some machines' pip configuration names index folders that do not exist;
    # drop only that warning, keep every other message.
    "$venv/bin/python" -m pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
pip_install --upgrade pip
