#!/usr/bin/env bash
# The test command: the package's tests, then every notebook at smoke size (tests/test_notebooks.py).
source "$(dirname "$0")/env.sh"
python -m pytest "$@"
