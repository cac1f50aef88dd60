#!/bin/sh
# The Python that `make` builds .venv with. TensorFlow 2.15 has wheels for Python 3.9-3.11 only.
# Prints one word on stdout: the path of a Python 3.9-3.11 (PYTHON=... if given, else the first
# of python3.11, python3.10, python3.9, python3 on PATH), or "uv" when none is found but uv is
# installed (uv then provides a Python 3.11). Otherwise prints "error: ..." (one line, for the
# Makefile's $(error)) and exits with 2. Never creates anything.
set -u

version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
supported() { case "$(version "$1")" in 3.9 | 3.10 | 3.11) return 0 ;; *) return 1 ;; esac; }
how='get one with `uv python install 3.11`, or name one: PYTHON=/path/to/python3.11 make demo'

if [ -n "${PYTHON:-}" ]; then
    if supported "$PYTHON"; then
        command -v "$PYTHON"
        exit 0
    fi
    found=$(version "$PYTHON")
    echo "error: PYTHON=$PYTHON is ${found:+Python $found, }not Python 3.9-3.11 (TensorFlow 2.15 has wheels for those only); $how"
    exit 2
fi
for name in python3.11 python3.10 python3.9 python3; do
    path=$(command -v "$name" 2>/dev/null) && supported "$path" && {
        echo "$path"
        exit 0
    }
done
if command -v uv >/dev/null 2>&1; then
    echo uv
    exit 0
fi
found=$(command -v python3 >/dev/null 2>&1 && version python3)
echo "error: no Python 3.9-3.11 found${found:+ (python3 is $found)}; TensorFlow 2.15 has wheels for those only: $how"
exit 2
