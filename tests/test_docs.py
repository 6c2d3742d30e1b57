"""The documentation site: built with warnings as errors, examples run, pages rendered.

* The site in ``docs/`` is built by Sphinx (``-W --keep-going``) in the
  environment of ``docs_env.py``; any warning fails.
* The examples written as doctests in the pages run (``-b doctest``).
* The API page has an entry for every public name of the documented modules,
  computed from the modules here, so a new public name without docs fails.
* Headless Chromium renders every page of the site (one per ``docs/*.md``),
  served over HTTP on 127.0.0.1: every request must succeed, every stylesheet
  must be loaded and applied (a computed style of the theme), and on the API
  page the API entries must be in the rendered DOM.  Chromium is installed with ``apt-get`` when it is missing
  and the tests run as root; otherwise these tests are skipped with the
  reason (``CYNAG_SKIP_BROWSER=1`` skips them too).
"""
import ast
import html
import http.server
import importlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest

from docs_env import docs_python, docs_requirements  # noqa: F401  (session fixture)
from venv_tools import REPO_ROOT

DOCS = os.path.join(REPO_ROOT, "docs")

#: Modules whose every public name must have an entry on the API page.
API_MODULES = ("cynag", "cynag.optimizers", "cynag.optimizer_hooks", "cynag.serializers",
               "cynag.multinode", "cynag.torch")

#: The site's pages, one per source file (sphinx -W fails on a page outside the toctree).
PAGES = sorted((f[:-3] for f in os.listdir(DOCS) if f.endswith(".md")),
               key=lambda p: (p != "index", p))

SPHINX_TIMEOUT_S = 600
BROWSER_TIMEOUT_S = 120


def _sphinx(python, builder, out, doctrees):
    cmd = [python, "-m", "sphinx", "-W", "--keep-going", "-b", builder, "-d", doctrees,
           DOCS, out]
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    # Deterministic examples: one thread, whatever the machine.
    env["CYNAG_NUM_THREADS"] = "1"
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=SPHINX_TIMEOUT_S, env=env,
                          cwd=tempfile.gettempdir())
    return proc.returncode, proc.stdout


@pytest.fixture(scope="module")
def site(docs_python, tmp_path_factory):
    """The HTML site built with warnings as errors: its folder."""
    root = tmp_path_factory.mktemp("docs")
    out = str(root / "html")
    rc, log = _sphinx(docs_python, "html", out, str(root / "doctrees"))
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    if rc != 0 or warnings:
        pytest.fail("sphinx-build -W failed (exit status %d):\n%s" % (rc, log[-20000:]),
                    pytrace=False)
    return out


def test_docs_requirements_have_a_major_version_cap():
    """The site is built with -W: a new major Sphinx, MyST or Furo may warn, so each is capped.

    The test environment installs exactly the ``docs`` extra (docs_env.py reads it).
    """
    reqs = docs_requirements()
    assert {re.split(r"[<>=!~ ]", r, 1)[0] for r in reqs} >= {"sphinx", "myst-parser", "furo"}
    uncapped = [r for r in reqs if not re.search(r"<\s*[\d.]+", r)]
    assert not uncapped, "docs requirements without an upper bound: %s" % uncapped


def test_site_builds_without_warnings(site):
    for page in ("index", "quickstart", "porting_chainer", "porting_chainermn", "torch",
                 "gpu", "threads", "checkpoints", "differences", "benchmarks", "api",
                 "internals", "building"):
        assert page in PAGES, page
    for page in PAGES:
        assert os.path.exists(os.path.join(site, page + ".html")), page


def test_doctests_in_the_pages_pass(docs_python, site, tmp_path):
    rc, log = _sphinx(docs_python, "doctest", str(tmp_path / "doctest"),
                      os.path.join(os.path.dirname(site), "doctrees"))
    if rc != 0:
        pytest.fail("sphinx-build -b doctest failed (exit status %d):\n%s"
                    % (rc, log[-20000:]), pytrace=False)
    m = re.search(r"^\s*(\d+) tests\s*$", log, re.M)
    assert m and int(m.group(1)) >= 10, "too few doctests ran:\n%s" % log[-5000:]
    assert re.search(r"^\s*0 failures in tests", log, re.M), log[-5000:]


# -- the API page lists every public name ------------------------------------------------

def _all_from_source(modname):
    """``__all__`` of a module read from its source (the module needs what is absent here)."""
    spec = importlib.util.find_spec(modname)
    with open(spec.origin) as f:
        tree = ast.parse(f.read())
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "__all__"):
            return list(ast.literal_eval(node.value))
    raise AssertionError("%s defines no __all__" % modname)


def public_anchors(modname):
    """The ``id`` every public name of ``modname`` must have on the API page.

    Public names: ``__all__`` if the module has it, else the names without a
    leading underscore that are not imported from outside cynag.  A
    submodule's anchor is ``module-<name>``; anything else's ``<module>.<name>``.
    """
    try:
        mod = importlib.import_module(modname)
    except ImportError:  # cynag.torch without PyTorch
        return {"%s.%s" % (modname, n) for n in _all_from_source(modname)}
    names = getattr(mod, "__all__", None)
    if names is None:
        names = []
        for n, obj in vars(mod).items():
            if n.startswith("_"):
                continue
            owner = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None)
            if owner is None or owner.split(".")[0] in ("cynag", "cynag_kernels"):
                names.append(n)
    anchors = set()
    for n in names:
        obj = getattr(mod, n)
        anchors.add("module-%s" % obj.__name__ if inspect.ismodule(obj) else "%s.%s" % (modname, n))
    return anchors


def _ids(text):
    return set(re.findall(r'\bid="([^"]+)"', text))


def _missing(ids):
    return {m: sorted(public_anchors(m) - ids) for m in API_MODULES if public_anchors(m) - ids}


def test_api_page_has_every_public_name(site):
    with open(os.path.join(site, "api.html"), encoding="utf-8") as f:
        ids = _ids(f.read())
    missing = _missing(ids)
    assert not missing, ("public names without an entry on the API page (add them to "
                         "docs/api.md): %s" % missing)


def test_public_names_are_found():
    """The check above has something to check: known names and a module anchor."""
    anchors = set().union(*(public_anchors(m) for m in API_MODULES))
    for a in ("cynag.optimizers.NesterovAG", "cynag.Link", "cynag.serializers.load_npz",
              "cynag.multinode.create_communicator", "cynag.torch.NesterovAG",
              "module-cynag.optimizer_hooks", "cynag.optimizer_hooks.GradientLARS"):
        assert a in anchors
    assert "cynag.serializers.os" not in anchors


# -- rendered in Chromium ----------------------------------------------------------------

CHECK_SCRIPT = """<script>
(function () {
  var r = {sheets: [], ids: []};
  document.querySelectorAll('link[rel="stylesheet"]').forEach(function (l) {
    var rules = -1;
    try { rules = l.sheet ? l.sheet.cssRules.length : -1; } catch (e) { rules = -2; }
    r.sheets.push({href: l.getAttribute('href'), rules: rules});
  });
  var page = document.querySelector('.page');
  r.pageDisplay = page ? getComputedStyle(page).display : null;
  r.bodyFont = getComputedStyle(document.body).fontFamily;
  document.querySelectorAll('[id]').forEach(function (e) {
    if (e.id.indexOf('cynag') === 0 || e.id.indexOf('module-cynag') === 0) r.ids.push(e.id);
  });
  document.documentElement.setAttribute('data-cynag-check', JSON.stringify(r));
})();
</script>"""

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser():
    exe = os.environ.get("CYNAG_CHROMIUM")
    if exe:
        return exe
    for name in _BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def chromium():
    """Path of a headless-capable Chromium, installed from Debian's packages when missing."""
    if os.environ.get("CYNAG_SKIP_BROWSER", "0") not in ("", "0"):
        pytest.skip("CYNAG_SKIP_BROWSER=1")
    exe = _find_browser()
    if exe:
        return exe
    can_install = (sys.platform.startswith("linux") and hasattr(os, "geteuid")
                   and os.geteuid() == 0 and shutil.which("apt-get"))
    if not can_install:
        pytest.skip("Chromium is not installed, and it can only be installed here as root "
                    "with apt-get (apt-get install chromium, or set CYNAG_CHROMIUM)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        sys.stderr.write("[cynag docs] %s ...\n" % " ".join(cmd))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=900, env=env)
        if proc.returncode != 0:
            pytest.fail("could not install Chromium (%s, exit status %d; set "
                        "CYNAG_SKIP_BROWSER=1 to skip these tests):\n%s"
                        % (" ".join(cmd), proc.returncode, proc.stdout[-5000:]),
                        pytrace=False)
    exe = _find_browser()
    if exe is None:
        pytest.fail("apt-get installed chromium but no browser executable is on PATH",
                    pytrace=False)
    return exe


class _Server:
    """The built site on 127.0.0.1, the check script injected into every page."""

    def __init__(self, root):
        self.requests = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=root, **kwargs)

            def do_GET(self):
                path = self.path.split("?", 1)[0].split("#", 1)[0]
                local = os.path.join(root, path.lstrip("/"))
                if path.endswith(".html") and os.path.isfile(local):
                    with open(local, "rb") as f:
                        body = f.read().replace(b"</body>", CHECK_SCRIPT.encode() + b"</body>")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                super().do_GET()

            def log_request(self, code="-", size="-"):
                server.requests.append((self.path, int(getattr(code, "value", code))))

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/" % self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def render(browser, site, page):
    """(check dict from the rendered DOM, [(path, status)] of the requests) for ``page``."""
    server = _Server(site)
    profile = tempfile.mkdtemp(prefix="cynag-chromium-")
    try:
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--user-data-dir=%s" % profile, "--window-size=1280,900",
                 # Hermetic: only the local server answers (MathJax's CDN fails at
                 # once instead of holding up the load event where there is no network).
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
        proc = subprocess.run(flags + ["--dump-dom", server.url + page],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=BROWSER_TIMEOUT_S)
    finally:
        server.close()
        shutil.rmtree(profile, ignore_errors=True)
    m = re.search(r'data-cynag-check="([^"]*)"', proc.stdout)
    if m is None:
        pytest.fail("Chromium rendered %s without running the check script (exit status %d):"
                    "\n%s\n%s" % (page, proc.returncode, proc.stdout[:3000], proc.stderr[-3000:]),
                    pytrace=False)
    return json.loads(html.unescape(m.group(1))), server.requests


def check_rendered(check, requests, page):
    """The problems of one rendered page (empty when it looks right)."""
    problems = ["%s answered %d" % (path, status) for path, status in requests
                if status >= 400 and not path.startswith("/favicon")]
    if not check["sheets"]:
        problems.append("%s links no stylesheet" % page)
    problems += ["stylesheet %s not loaded (%d rules)" % (s["href"], s["rules"])
                 for s in check["sheets"] if s["rules"] <= 0]
    if check["pageDisplay"] != "flex":  # furo's page layout: the theme's CSS applies
        problems.append("%s: the theme's layout is not applied (.page display %r)"
                        % (page, check["pageDisplay"]))
    if not any(s["href"].split("?")[0].endswith("_static/cynag.css") for s in check["sheets"]):
        problems.append("%s does not link _static/cynag.css" % page)
    return problems


@pytest.mark.parametrize("page", [p + ".html" for p in PAGES])
def test_page_renders_in_chromium(chromium, site, page):
    assert os.path.isfile(os.path.join(site, page)), "the site has no %s" % page
    check, requests = render(chromium, site, page)
    problems = check_rendered(check, requests, page)
    if page == "api.html":
        missing = _missing(set(check["ids"]))
        if missing:
            problems.append("API entries missing from the rendered page: %s" % missing)
    if not any(path.split("?")[0].endswith(".css") for path, _ in requests):
        problems.append("no stylesheet was requested: %s" % requests)
    assert not problems, "\n".join(problems)
