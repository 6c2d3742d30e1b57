"""What tests/chainer_env.py and tests/cuda_env.py share: a private virtual environment.

Each environment lives in a folder named by an environment variable or a
default under the repository, is created or completed under a file lock,
reports progress on stderr, and runs its interpreter with an environment from
which the variables that would leak the calling interpreter are removed.
"""
import contextlib
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCK_NAME = ".cynag-env.lock"

#: Variables that would make an environment's interpreter import the working
#: tree or another installation instead of its own packages.
LEAKING_ENV = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE",
               "PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PIP_REQUIRE_VIRTUALENV",
               "VIRTUAL_ENV", "__PYVENV_LAUNCHER__")


class EnvError(RuntimeError):
    """An environment could not be set up, or a command in it failed."""


class Venv:
    """One private virtual environment of the test suite.

    Args:
        tag: name in progress messages (``chainer-env``).
        env_var: variable that overrides the folder.
        default_name: folder under the repository root otherwise.
        error: subclass of :class:`EnvError` raised on failure.
        dropped: extra variables to remove from the child environment.
        dropped_prefixes: prefixes of variables to remove.
        private_files: names this code keeps in the folder (not user data).
    """

    def __init__(self, tag, env_var, default_name, error=EnvError, dropped=(),
                 dropped_prefixes=(), private_files=()):
        self.tag, self.env_var, self.default_name, self.error = tag, env_var, default_name, error
        self.dropped = set(LEAKING_ENV) | set(dropped)
        self.dropped_prefixes = tuple(dropped_prefixes)
        self.private_files = {LOCK_NAME} | set(private_files)

    def dir(self):
        """The environment's folder."""
        d = os.environ.get(self.env_var) or os.path.join(REPO_ROOT, self.default_name)
        return os.path.abspath(os.path.expanduser(d))

    def python(self, d=None):
        """The interpreter of the environment in ``d`` (default :meth:`dir`)."""
        d = self.dir() if d is None else d
        if os.name == "nt":
            return os.path.join(d, "Scripts", "python.exe")
        return os.path.join(d, "bin", "python")

    def clean_env(self, extra=None):
        """``os.environ`` without the variables that would leak the calling environment."""
        env = {k: v for k, v in os.environ.items()
               if k not in self.dropped and not (self.dropped_prefixes
                                                 and k.startswith(self.dropped_prefixes))}
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env["PYTHONNOUSERSITE"] = "1"
        if extra:
            env.update(extra)
        return env

    def progress(self, msg):
        sys.stderr.write("[cynag %s] %s\n" % (self.tag, msg))
        sys.stderr.flush()

    def run(self, cmd, what, timeout, cwd=None):
        """Run ``cmd``; return (output, seconds), or raise ``self.error`` carrying the output."""
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  universal_newlines=True, timeout=timeout,
                                  env=self.clean_env(), cwd=cwd or tempfile.gettempdir())
        except subprocess.TimeoutExpired as e:
            out = e.stdout or ""
            if isinstance(out, bytes):
                out = out.decode("utf-8", "replace")
            raise self.error("%s timed out after %d s: %s\n%s"
                             % (what, timeout, " ".join(cmd), out)) from None
        except OSError as e:
            raise self.error("%s could not run %s: %s" % (what, " ".join(cmd), e)) from None
        if proc.returncode != 0:
            raise self.error("%s failed (exit status %d): %s\n%s"
                             % (what, proc.returncode, " ".join(cmd), proc.stdout))
        return proc.stdout, time.time() - t0

    def python_ok(self, python, code):
        """True if ``python -c code`` exits 0."""
        if not os.path.exists(python):
            return False
        try:
            return subprocess.run([python, "-c", code], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, timeout=120, env=self.clean_env(),
                                  cwd=tempfile.gettempdir()).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    @contextlib.contextmanager
    def locked(self, d):
        """Exclusive lock on ``d`` (several pytest processes may set it up at once)."""
        os.makedirs(d, exist_ok=True)
        f = open(os.path.join(d, LOCK_NAME), "a+")
        try:
            try:
                import fcntl
            except ImportError:  # Windows
                fcntl = None
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            else:  # pragma: no cover - Windows
                import msvcrt

                while True:
                    try:
                        msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                        break
                    except OSError:
                        time.sleep(0.5)
            yield
        finally:
            f.close()  # releases the lock

    def open(self):
        """``(folder, interpreter)`` of the environment; a folder that is not one of
        ours yet is checked first (:meth:`check_target_dir`)."""
        d = self.dir()
        if not os.path.exists(os.path.join(d, LOCK_NAME)):
            self.check_target_dir(d)
        return d, self.python(d)

    def check_target_dir(self, d):
        """Refuse to write into an existing folder that is not a virtual environment."""
        if not os.path.isdir(d):
            if os.path.exists(d):
                raise self.error("%s exists and is not a directory; set %s to another path"
                                 % (d, self.env_var))
            return
        entries = set(os.listdir(d)) - self.private_files
        if entries and not os.path.exists(os.path.join(d, "pyvenv.cfg")):
            raise self.error(
                "%s exists, is not empty and is not a virtual environment; refusing to install "
                "into it.  Remove it or set %s to another path." % (d, self.env_var))


def provide_or_fail(request, venv, ensure, what, skip_var):
    """Body of a session fixture: ``ensure()``'s interpreter, or a clear fail/skip.

    A setup failure fails the test with the command's output, unless
    ``skip_var=1`` is set, in which case the test is skipped with the reason.
    """
    import pytest

    try:
        with capture_disabled(request):
            return ensure()
    except venv.error as e:
        error = str(e)  # reported outside the except block: no chained traceback
    if os.environ.get(skip_var, "0") not in ("", "0"):
        pytest.skip("%s=1 and the %s environment is not available: %s"
                    % (skip_var, what, error.splitlines()[0]))
    pytest.fail("could not set up the %s environment in %s (set %s=1 to skip these "
                "tests):\n%s" % (what, venv.dir(), skip_var, error), pytrace=False)


def capture_disabled(request):
    """Context in which progress messages reach the terminal during a pytest run."""
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is None:
        return contextlib.nullcontext()
    return capman.global_and_fixture_disabled()
