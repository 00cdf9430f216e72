#!/usr/bin/env bash
# Create the virtual environment and install stylid with its test extras, CPU build of torch.
#
# - torch is pinned exactly (torch==2.13.0 in pyproject.toml): pip then takes the CPU wheel lying on local disk
#   where there is one; an open range would pull a multi-GB CUDA build. Use pip (uv/poetry don't look there).
# - OpenCV: insightface declares the GUI build `opencv-python`; stylid wants `opencv-python-headless` (no X11/GL
#   libraries on servers). Both wheels unpack into the same cv2/ folder, so after the install we remove both and put
#   back the headless build alone, at the same version. insightface runs on it unchanged.
# - constraints.txt (written by `make lock`) pins every package to the versions the suite last passed on; LOCK=none
#   installs from pyproject.toml's ranges alone (what `make lock` does to find today's versions).
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-test}
LOCK=${LOCK:-constraints.txt}
constraints=()
if [ "$LOCK" != none ]; then
  constraints=(-c "$LOCK")
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "${constraints[@]}" -e ".[${EXTRAS}]"

cv_version=$("$VENV/bin/python" -m pip show opencv-python-headless 2>/dev/null | awk '/^Version:/{print $2}')
if "$VENV/bin/python" -m pip show opencv-python >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip uninstall --quiet -y opencv-python opencv-python-headless
  "$VENV/bin/python" -m pip install --quiet --no-deps "${constraints[@]}" "opencv-python-headless==${cv_version}"
fi
"$VENV/bin/python" -c "import cv2, dlib, torch, ray; print('stylid environment ready: torch', torch.__version__, '| ray', ray.__version__, '| opencv', cv2.__version__, '| dlib', dlib.__version__)"
