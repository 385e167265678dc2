#!/usr/bin/env bash
# Build the one-folder desktop package with PyInstaller and smoke-test it.
#
#   bash packaging/build.sh        -> dist/lora-studio/ (run dist/lora-studio/lora-studio)
#
# Needs the set-up of `bash packaging/setup.sh` first (it uses .venv). Takes several minutes and a
# few GB of disk (torch is large); not part of CI. On Linux it also writes a .desktop entry and the
# icons under dist/lora-studio/share/ for installing into ~/.local/share.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin
"$V/python" -m pip install -q ".[package]"
start=$(date +%s)
"$V/pyinstaller" --noconfirm --clean --distpath dist --workpath build/pyinstaller packaging/lora-studio.spec
share=dist/lora-studio/share
mkdir -p "$share/applications" "$share/icons/hicolor/scalable/apps"
cp resources/lora-studio.desktop "$share/applications/"
cp resources/icons/lora-studio.svg "$share/icons/hicolor/scalable/apps/"
echo "built in $(( $(date +%s) - start )) s: $(du -sh dist/lora-studio | cut -f1)"
# The smoke test: the packaged window opens on the default model and reports its start-up time;
# the command line answers too.
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
LORA_STUDIO_HOME=$(mktemp -d) dist/lora-studio/lora-studio --version
LORA_STUDIO_HOME=$(mktemp -d) dist/lora-studio/lora-studio gui --smoke
echo "packaged studio passed --smoke"
