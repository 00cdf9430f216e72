#!/usr/bin/env bash
# `make lock`: refresh constraints.txt, the versions the README's two commands install.
#
# pyproject.toml keeps the library's ranges; constraints.txt pins the whole environment an application install gets
# (pip's constraints file: `pip install -c constraints.txt -e .[test]`, what scripts/setup.sh does). This builds a
# fresh environment from the ranges alone (today's newest versions), writes its versions to constraints.txt (local
# version labels such as +cpu dropped, so a CUDA build of the same torch still satisfies it) and runs the whole
# suite on it. Commit constraints.txt when the suite passes.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${LOCK_VENV:-.venv-lock}
rm -rf "$VENV"
PYTHON=$PYTHON VENV=$VENV LOCK=none bash scripts/setup.sh
{
  echo "# Written by 'make lock' (scripts/lock.sh) on $(date -u +%Y-%m-%d): the versions a fresh install of"
  echo "# pyproject.toml's ranges resolved to, which the suite passed on. scripts/setup.sh installs with these."
  "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -e '^-e ' -e '^stylid==' | sed -E 's/\+[A-Za-z0-9.]+$//'
  # insightface declares the GUI build; setup.sh swaps it for the headless one at the same version
  "$VENV/bin/python" -m pip show opencv-python-headless | awk '/^Version:/{print "opencv-python==" $2}'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest tests -q
echo "constraints.txt refreshed and the suite passed on it; commit it"
