"""The repaired wheel as a user installs it: no compiler, its own OpenMP runtime.

The session's release build (tools/build_wheels.sh, see release_artifacts.py)
gives a manylinux wheel with libgomp copied into ``cynag.libs/``. It is
installed into a fresh virtual environment whose PATH holds nothing but the
environment's own scripts (no compiler), with ``CC=false CXX=false``; there
cynag must import, run its demo, load the vendored libgomp rather than the
system's, and report one version everywhere.
"""
import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import pytest

from release_artifacts import ROOT, clean_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="tools/build_wheels.sh repairs wheels with auditwheel (Linux)"),
]

#: Names under which a C or C++ compiler could be found.
COMPILERS = ("cc", "gcc", "c++", "g++", "clang", "clang++", "icx", "x86_64-linux-gnu-gcc",
             "aarch64-linux-gnu-gcc")


def _run(cmd, env, cwd, timeout=600):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, env=env, cwd=str(cwd), timeout=timeout)
    if proc.returncode != 0:
        pytest.fail("command failed (exit status %d): %s\n--- stdout\n%s\n--- stderr\n%s"
                    % (proc.returncode, " ".join(cmd), proc.stdout[-5000:], proc.stderr[-5000:]),
                    pytrace=False)
    return proc


def _repo_version():
    """The literal in cynag/_version.py, read without importing anything."""
    with open(os.path.join(ROOT, "cynag", "_version.py")) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError("no __version__ = ... in cynag/_version.py")


class WheelVenv:
    """A fresh virtual environment with the wheel installed, and no compiler on PATH."""

    def __init__(self, root, wheel):
        self.root, self.wheel = root, wheel
        self.bin = root / "venv" / "bin"
        self.python = str(self.bin / "python")
        # The environment's own scripts and nothing else: no /usr/bin, so no cc.
        self.env = clean_env({"PATH": str(self.bin), "CC": "false", "CXX": "false",
                              "LDSHARED": "false"})
        self.env.pop("LD_LIBRARY_PATH", None)  # the loader finds what the RPATH says
        self.cwd = root  # away from the checkout: nothing imports the source tree
        _run([sys.executable, "-m", "venv", str(root / "venv")], clean_env(), root)
        # --only-binary: numpy must come as a wheel too; nothing may be compiled.
        self.install = _run([self.python, "-m", "pip", "install", "--no-cache-dir",
                             "--only-binary", ":all:", str(wheel)], self.env, root)

    def run(self, *args, **kw):
        return _run([self.python] + list(args), self.env, self.cwd, **kw)

    def site_packages(self):
        return self.run("-c", "import sysconfig; print(sysconfig.get_paths()['platlib'])"
                        ).stdout.strip()


@pytest.fixture(scope="module")
def wheel(release_artifacts):
    assert release_artifacts.wheel is not None, release_artifacts.log[-3000:]
    return release_artifacts.wheel


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory, wheel):
    return WheelVenv(tmp_path_factory.mktemp("wheel-venv"), wheel)


def test_script_reports_the_policy_and_the_vendored_libgomp(release_artifacts, wheel):
    log = release_artifacts.log
    m = re.search(r"platform tag: (manylinux_\d+_\d+_\w+)", log)
    assert m, log[-3000:]
    assert wheel.name.endswith("-%s.whl" % m.group(1)), (wheel.name, m.group(1))
    assert re.search(r"vendored libraries: .*cynag\.libs/libgomp-[0-9a-f]+\.so", log), log[-3000:]
    # auditwheel show of the repaired wheel (its lines wrap where they will)
    assert ('consistent with the following platform tag: "%s"' % m.group(1)
            in " ".join(log.split())), log[-3000:]
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(re.fullmatch(r"cynag\.libs/libgomp-[0-9a-f]+\.so[.0-9]*", n) for n in names), names
    assert not any(n.endswith((".c", ".pyx.c", ".o")) for n in names), names


def test_fresh_venv_has_no_compiler(wheel_venv):
    probe = textwrap.dedent(
        """
        import json, os, shutil, subprocess, sys, sysconfig
        found = {c: shutil.which(c) for c in sys.argv[1:]}
        cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
        try:
            rc = subprocess.run([cc, "--version"], capture_output=True).returncode
        except FileNotFoundError:
            rc = "not found"
        try:  # CC=false, itself not on this PATH: a build fails either way
            env_cc = subprocess.run([os.environ["CC"], "-c", "x.c"]).returncode
        except FileNotFoundError:
            env_cc = "not found"
        print(json.dumps({"found": found, "path": os.environ["PATH"], "sysconfig_cc": rc,
                          "env_cc": env_cc}))
        """
    )
    res = json.loads(wheel_venv.run("-c", probe, *COMPILERS).stdout)
    assert res["path"] == str(wheel_venv.bin)
    assert all(v is None for v in res["found"].values()), res
    assert res["sysconfig_cc"] == "not found", res  # the compiler Python was built with
    assert res["env_cc"] != 0, res  # CC=false: any build would fail
    # pip installed cynag from the wheel, built nothing.
    out = wheel_venv.install.stdout + wheel_venv.install.stderr
    assert "Building wheel" not in out and "setup.py" not in out, out


def test_wheel_imports_and_runs_the_demo(wheel_venv):
    out = wheel_venv.run("-c", "import cynag, sys; print(cynag.__file__); cynag.show_config()"
                         ).stdout
    assert out.splitlines()[0].startswith(wheel_venv.site_packages()), out
    assert "OpenMP:    enabled" in out, out
    demo = wheel_venv.run("-m", "cynag.demo", "--epochs", "3", timeout=300).stdout
    m = re.search(r"final: test loss ([0-9.]+), test accuracy ([0-9.]+)", demo)
    assert m, demo
    assert float(m.group(2)) > 0.5, demo


def test_extensions_load_the_vendored_libgomp(wheel_venv):
    site = wheel_venv.site_packages()
    libs = os.path.join(site, "cynag.libs")
    vendored = [f for f in os.listdir(libs) if f.startswith("libgomp-")]
    assert len(vendored) == 1, os.listdir(libs)
    sos = sorted(os.path.join(d, f) for pkg in ("cynag", "cynag_kernels")
                 for d, _, fs in os.walk(os.path.join(site, pkg)) for f in fs if f.endswith(".so"))
    with zipfile.ZipFile(wheel_venv.wheel) as z:
        in_wheel = sorted(n for n in z.namelist() if n.endswith(".so") and ".libs/" not in n)
    assert sorted(os.path.relpath(so, site) for so in sos) == in_wheel, (sos, in_wheel)
    assert len(sos) >= 5, sos  # the four kernel modules and cynag._step at least
    env = clean_env()
    env.pop("LD_LIBRARY_PATH", None)
    for so in sos:
        ldd = subprocess.run(["ldd", so], capture_output=True, text=True, env=env).stdout
        gomp = [line.split() for line in ldd.splitlines() if "gomp" in line]
        if not gomp:  # a module without OpenMP calls need not link it
            continue
        for fields in gomp:
            # "libgomp-<hash>.so.1.0.0 => <site>/cynag.libs/libgomp-<hash>.so.1.0.0 (0x...)"
            assert fields[0].startswith("libgomp-") and "=>" in fields, (so, ldd)
            target = os.path.realpath(fields[2])
            assert target == os.path.realpath(os.path.join(libs, vendored[0])), (so, ldd)
        assert "libgomp.so.1 " not in ldd, (so, ldd)
    assert any("gomp" in subprocess.run(["ldd", so], capture_output=True, text=True,
                                        env=env).stdout for so in sos)
    # What the running process maps once cynag is imported: only the vendored copy.
    maps = wheel_venv.run("-c", textwrap.dedent(
        """
        import cynag
        cynag.set_num_threads(2)
        print("\\n".join(sorted({l.split()[-1] for l in open("/proc/self/maps")
                                 if "gomp" in l})))
        """)).stdout.split()
    assert maps and all(os.path.realpath(p) == os.path.realpath(os.path.join(libs, vendored[0]))
                        for p in maps), maps


def test_one_version_in_the_installed_wheel(wheel_venv, wheel):
    res = json.loads(wheel_venv.run("-c", textwrap.dedent(
        """
        import io, json, importlib.metadata, cynag
        buf = io.StringIO()
        cynag.show_config(file=buf)
        print(json.dumps({"attr": cynag.__version__, "config": cynag.config()["cynag"],
                          "show": buf.getvalue().splitlines()[0],
                          "metadata": importlib.metadata.version("cynag")}))
        """)).stdout)
    version = _repo_version()
    assert res == {"attr": version, "config": version, "show": "cynag %s" % version,
                   "metadata": version}
    assert wheel.name.startswith("cynag-%s-" % version), wheel.name


def test_wheel_waits_passively_beside_a_preloaded_system_libgomp(wheel_venv):
    """The wheel's own OpenMP runtime is loaded with cynag's wait policy, and a
    system libgomp.so.1 loaded first (another library's) does not change it."""
    code = textwrap.dedent(
        """
        import ctypes, json, sys
        if sys.argv[1] == "preload":
            ctypes.CDLL("libgomp.so.1")
        import cynag
        from cynag_kernels import threads
        print(json.dumps({"wait": cynag.config()["threads"]["wait_policy"],
                          "one": threads._spin_limits_default()}))
        """)
    for how in ("none", "preload"):
        out = json.loads(wheel_venv.run("-c", code, how).stdout.splitlines()[-1])
        w = out["wait"]
        assert w["source"] == "cynag default", (how, w)
        assert w["policy"] == "OMP_WAIT_POLICY=passive", (how, w)
        assert not w["spin_unbounded"] and not out["one"], (how, out)
        assert w["libgomp"] and all("/cynag.libs/libgomp-" in p for p in w["libgomp"]), w
