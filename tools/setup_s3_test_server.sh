#!/usr/bin/env bash
# Create .venv-moto/ in the project root with moto's standalone S3 server, for the S3 tests.
#
# moto and s3fs pin botocore to different ranges; installed into one venv, pip resolves by falling back to an
# ancient s3fs. So moto lives in its own venv and the tests run its `moto_server` binary as a subprocess.
# Idempotent: when .venv-moto/bin/moto_server already runs, this exits at once.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-moto"
PYTHON="${PYTHON:-python3}"

if [[ -x "$VENV/bin/moto_server" ]] && "$VENV/bin/python" -c "import moto.server" 2>/dev/null; then
    echo "moto server ready: $VENV/bin/moto_server"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check 'moto[server]'
"$VENV/bin/python" -c "import moto.server" >/dev/null
echo "moto server installed: $VENV/bin/moto_server"
