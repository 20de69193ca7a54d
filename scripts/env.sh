#!/usr/bin/env bash
# Creates (once) the cached development virtual environment and prints its path.
#
# The environment lives outside the checkout, keyed by a hash of
# scripts/requirements-dev.txt and the Python version, because torch alone is
# several GB. A `.complete` marker is written only after every install
# succeeded; an environment without it (an interrupted install) is wiped and
# built again from nothing.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
req="$here/requirements-dev.txt"
python="${PYTHON:-python3}"
key="$( (cat "$req"; "$python" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)"
root="${LEANSTREAM_CACHE:-$HOME/.cache/leanstream}"
venv="$root/venv-$key"
mkdir -p "$root"
exec 9>"$root/.lock-$key"
flock 9
if [ ! -f "$venv/.complete" ]; then
    echo "leanstream: building $venv (the first run downloads torch: a few minutes)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -r "$req" >&2
    touch "$venv/.complete"
fi
echo "$venv"
