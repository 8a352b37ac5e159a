#!/usr/bin/env bash
# The main job: run the notebooks headless at full size with papermill; outputs go to runs/demo/.
source "$(dirname "$0")/env.sh"
python -m hyperlora.notebooks --out runs/demo "$@"
