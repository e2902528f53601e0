#!/usr/bin/env bash
# Check what `make` needs before it builds anything, and say plainly what is missing.
set -u
missing=0
python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      python_bin=$candidate; break
    fi
  done
fi
if [ -z "$python_bin" ]; then
  echo "missing: Python 3.11 (install it, or set PYTHON=/path/to/python3.11)" >&2; missing=1
elif ! "$python_bin" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  echo "missing: the venv/ensurepip modules for $python_bin (Debian: apt-get install python3.11-venv)" >&2; missing=1
fi
if ! command -v java >/dev/null 2>&1; then
  echo "missing: Java 17 or newer for Spark (Debian: apt-get install openjdk-17-jre-headless)" >&2; missing=1
else
  java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)
  if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then
    echo "missing: Java 17 or newer for Spark (found: $(java -version 2>&1 | head -n 1))" >&2; missing=1
  fi
fi
[ "$missing" -eq 0 ] || exit 1
echo "$python_bin"
