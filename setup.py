"""Build script for the native kernels in ``cynag_kernels``.

The package metadata lives in ``pyproject.toml``; this file only declares the
Cython extensions and decides how to compile them:

* OpenMP is probed for the compiler in use by compiling, linking and running a
  tiny parallel program with the flags that compiler needs (``-fopenmp`` for
  GCC and Clang, ``/openmp`` for MSVC, ``-Xpreprocessor -fopenmp -lomp`` for
  Apple Clang, with the include and library folders of Homebrew's libomp or of
  ``CYNAG_LIBOMP_PREFIX``).  If no flag works the extensions are built without OpenMP,
  single-threaded and still correct, with a loud warning; ``cynag.show_config()``
  reports it.  ``CYNAG_DISABLE_OPENMP=1`` forces such a build.
* Floating-point contraction into fused multiply-add is switched off
  (``-ffp-contract=off``; MSVC's default ``/fp:precise`` does not contract), so
  that the CPU update is bit-identical to Chainer's numpy sequence.
* No run-time library path into the building Python's installation: an
  interpreter built with ``-Wl,-rpath,<prefix>/lib`` (pyenv's) hands it on in
  ``LDSHARED``, and the extensions would carry that build machine's folder as
  their ``RUNPATH``.  They do not link libpython on Linux and need nothing
  from there, so such entries are dropped from the extension link command
  (other rpaths, e.g. from ``$LDFLAGS`` pointing elsewhere, are kept).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

_OPENMP_TEST_PROGRAM = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d %d\\n", n, omp_get_max_threads());
        return n == omp_get_max_threads() ? 0 : 1;
    }
    """
)


def _compiler_family(compiler):
    """'msvc', 'apple-clang', 'clang', 'intel' or 'gcc' for a distutils compiler."""
    if compiler.compiler_type == "msvc":
        return "msvc"
    exe = os.path.basename(str(compiler.compiler[0])) if getattr(compiler, "compiler", None) else "cc"
    try:
        version = subprocess.run(
            [compiler.compiler[0], "--version"], capture_output=True, text=True, timeout=30
        ).stdout.lower()
    except Exception:  # pragma: no cover - exotic toolchains
        version = exe
    if "apple" in version and "clang" in version:
        return "apple-clang"
    if "clang" in version:
        return "clang"
    if "icc" in exe or "icx" in exe or "intel" in version:
        return "intel"
    return "gcc"


def _libomp_prefixes():
    """Folders that may hold LLVM's libomp for Apple Clang (include/omp.h, lib/libomp.dylib).

    ``CYNAG_LIBOMP_PREFIX`` first, then Homebrew's (``brew --prefix libomp``,
    which is keg-only: neither folder is on the compiler's default paths).
    """
    prefixes = []
    if os.environ.get("CYNAG_LIBOMP_PREFIX"):
        prefixes.append(os.environ["CYNAG_LIBOMP_PREFIX"])
    brew = shutil.which("brew")
    if brew:
        try:
            out = subprocess.run([brew, "--prefix", "libomp"], capture_output=True,
                                 text=True, timeout=60)
            if out.returncode == 0 and out.stdout.strip():
                prefixes.append(out.stdout.strip())
        except Exception:  # pragma: no cover - a broken Homebrew
            pass
    prefixes += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    seen, found = set(), []
    for p in prefixes:
        if p not in seen and os.path.isfile(os.path.join(p, "include", "omp.h")):
            seen.add(p)
            found.append(p)
    return found


def _openmp_flags(family):
    """Candidate (compile_args, link_args) pairs for OpenMP, best first."""
    if family == "msvc":
        return [(["/openmp"], [])]
    if family == "apple-clang":
        return [(["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(p, "include")],
                 ["-L" + os.path.join(p, "lib"), "-lomp"]) for p in _libomp_prefixes()] + [
                    (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    if family == "intel":
        return [(["-fiopenmp"], ["-fiopenmp"]), (["-qopenmp"], ["-qopenmp"])]
    return [(["-fopenmp"], ["-fopenmp"])]


def _probe_openmp(compiler, compile_args, link_args):
    """Compile, link and run a tiny OpenMP program; True if it all works."""
    tmp = tempfile.mkdtemp(prefix="cynag-omp-")
    cwd = os.getcwd()
    try:
        os.chdir(tmp)
        with open("omp_probe.c", "w") as f:
            f.write(_OPENMP_TEST_PROGRAM)
        objects = compiler.compile(["omp_probe.c"], extra_postargs=compile_args)
        exe = "omp_probe" + (".exe" if sys.platform == "win32" else "")
        compiler.link_executable(objects, "omp_probe", extra_postargs=link_args)
        out = subprocess.run([os.path.join(tmp, exe)], capture_output=True, text=True, timeout=60)
        return out.returncode == 0
    except Exception:
        return False
    finally:
        os.chdir(cwd)
        shutil.rmtree(tmp, ignore_errors=True)


def _python_lib_dirs():
    """Folders of the building Python's installation (realpaths): its prefixes and LIBDIR."""
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            sysconfig.get_config_var("LIBDIR") or ""}
    return {os.path.realpath(d) for d in dirs if d}


def _is_python_path(path, python_dirs):
    path = os.path.realpath(path)
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in python_dirs)


def _without_python_rpath(cmd, python_dirs=None):
    """The link command ``cmd`` (a list) without rpaths into the building Python's folders.

    Handles ``-Wl,-rpath,DIR``, ``-Wl,-rpath=DIR``, ``-Wl,-R,DIR``, ``-Wl,-RDIR`` and
    ``-Wl,-rpath -Wl,DIR``; an ``-Wl,`` option listing several rpaths keeps the others.
    """
    if python_dirs is None:
        python_dirs = _python_lib_dirs()
    out, i = [], 0
    while i < len(cmd):
        arg = cmd[i]
        if arg in ("-Wl,-rpath", "-Wl,-R") and i + 1 < len(cmd) and cmd[i + 1].startswith("-Wl,"):
            if _is_python_path(cmd[i + 1][4:], python_dirs):
                i += 2
                continue
        elif arg.startswith("-Wl,"):
            parts, kept, j = arg[4:].split(","), [], 0
            while j < len(parts):
                p = parts[j]
                if p in ("-rpath", "-R", "--rpath") and j + 1 < len(parts):
                    if not _is_python_path(parts[j + 1], python_dirs):
                        kept += [p, parts[j + 1]]
                    j += 2
                    continue
                for prefix in ("-rpath=", "--rpath=", "-R"):
                    if p.startswith(prefix) and len(p) > len(prefix):
                        if _is_python_path(p[len(prefix):], python_dirs):
                            p = None
                        break
                if p is not None:
                    kept.append(p)
                j += 1
            if not kept:
                i += 1
                continue
            arg = "-Wl," + ",".join(kept)
        out.append(arg)
        i += 1
    return out


class BuildExt(build_ext):
    """build_ext that adds OpenMP (when it works) and strict FP flags."""

    def build_extensions(self):
        family = _compiler_family(self.compiler)
        compile_args, link_args, openmp = [], [], False
        if os.environ.get("CYNAG_DISABLE_OPENMP", "0") not in ("", "0"):
            print("cynag: OpenMP disabled by CYNAG_DISABLE_OPENMP", file=sys.stderr)
        else:
            for c_args, l_args in _openmp_flags(family):
                if _probe_openmp(self.compiler, c_args, l_args):
                    compile_args, link_args, openmp = list(c_args), list(l_args), True
                    break
            if not openmp:
                print(
                    "\n" + "*" * 72 + "\n"
                    "cynag: WARNING: the compiler (%s) could not build an OpenMP program.\n"
                    "The CPU kernels are built single-threaded (still correct).\n"
                    "Install an OpenMP runtime (libgomp / libomp) to get threads.\n" % family
                    + "*" * 72 + "\n",
                    file=sys.stderr,
                )
        if family == "msvc":
            fp_args = ["/fp:precise"]
        else:
            fp_args = ["-ffp-contract=off", "-fno-fast-math", "-O3"]
        compiler_desc = "%s (%s)" % (family, os.path.basename(str(self.compiler.compiler[0]))
                                     if getattr(self.compiler, "compiler", None) else family)
        for attr in ("linker_so", "linker_so_cxx"):
            if isinstance(getattr(self.compiler, attr, None), list):
                setattr(self.compiler, attr, _without_python_rpath(getattr(self.compiler, attr)))
        for ext in self.extensions:
            ext.extra_compile_args = fp_args + compile_args + list(ext.extra_compile_args or [])
            ext.extra_link_args = link_args + list(ext.extra_link_args or [])
            ext.define_macros = list(ext.define_macros or []) + [
                ("CYNAG_COMPILER", '"%s"' % compiler_desc.replace('"', "")),
                ("CYNAG_OPENMP_FLAGS", '"%s"' % " ".join(compile_args)),
            ]
        super().build_extensions()


def _extensions():
    import numpy
    from Cython.Build import cythonize

    names = ["_openmp_helpers", "_nesterov_cpu", "_probe", "_pack"]
    exts = [
        Extension(
            "cynag_kernels.%s" % name,
            ["cynag_kernels/%s.pyx" % name],
            include_dirs=["cynag_kernels", numpy.get_include()],
            # Runs on NumPy >= 1.23 whichever NumPy it is built against.
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                           ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION")],
            depends=["cynag_kernels/_half.h", "cynag_kernels/_hook_ops.h",
                     "cynag_kernels/_nag_coef.h", "cynag_kernels/_dense.h",
                     "cynag_kernels/_openmp.pxd", "cynag_kernels/_prefetch.h",
                     "cynag_kernels/_probe.h", "cynag_kernels/_kernel_api.h"],
        )
        for name in names
    ]
    # The optimizer's per-step collection (reads parameter objects: part of cynag).
    exts.append(Extension(
        "cynag._step",
        ["cynag/_step.pyx"],
        include_dirs=["cynag_kernels", numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION"),
                       ("NPY_TARGET_VERSION", "NPY_1_23_API_VERSION")],
        depends=["cynag_kernels/_half.h", "cynag_kernels/_nag_coef.h",
                 "cynag_kernels/_dense.h", "cynag_kernels/_kernel_api.h"],
    ))
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
