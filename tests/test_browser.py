"""The notebooks in a real browser: JupyterLab driven by headless Chromium (Playwright, sync API).

nbval proves the notebook code runs; this proves a person sees the plots and can use the widgets.
For each notebook the test opens it in JupyterLab, runs Run > Run All Cells from the menu, waits for the
kernel to be idle, and asserts:

* every code cell ran, and nothing shows an error (error outputs, tracebacks on stderr, rendered text
  with a traceback or an ``XxxError:``, widgets that failed to render or are still "Loading widget...");
* each plotly figure is drawn: a ``.js-plotly-plot`` with a non-empty SVG, as many traces in the browser
  (``gd.data``) as the figure Python sent (the output's plotly JSON, or the kernel's FigureWidget), and
  the last version of it (as many points per trace as the output holds: an output updated in place
  is not redrawn by jupyterlab-plotly once drawn), not a static PNG in its place;
* the explorer (``foxlab.viz.explore``) is shown, and picking another option in its head dropdown
  changes the head in the kernel and redraws its FigureWidget in the browser;
* no JavaScript page errors or console errors (the benign ones are listed with the reason).

A scratch notebook written here (a figure, a tqdm bar, and a small explorer built the same way) runs
first: it checks the harness itself, so a failure on it is the browser set-up, not the foxlab notebooks.

JupyterLab runs on 127.0.0.1 on a free port with a token, from this venv's python (so the ``python3``
kernel is this venv's), in a temp root dir holding copies of notebooks/ with their outputs cleared, and
temp config/data/runtime/settings dirs; FOXLAB_FAST=1 is set in its environment. The server, its
kernels and the temp dirs are removed whatever happens. Screenshots go to test-artifacts/browser/.

Chromium is Debian's package (tests/browser_setup.py installs it when missing and we are root); where it
cannot be had the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from browser_setup import CHROMIUM_ARGS, ChromiumUnavailable, find_chromium

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ARTIFACTS = REPO / "test-artifacts" / "browser"
VIZ_NOTEBOOK = "05_visualizing_forgetting.ipynb"
TRAIN_NOTEBOOK = "04_train_a_small_fox.ipynb"
SCRATCH_NOTEBOOK = "browser_scratch.ipynb"

SERVER_START_TIMEOUT_S = 60
NOTEBOOK_OPEN_TIMEOUT_S = 90  # page load + kernel start, on 2 busy cores
# The slowest notebook in fast mode, with a margin for a busy machine; FOXLAB_BROWSER_TIMEOUT_S changes it.
RUN_ALL_TIMEOUT_S = float(os.environ.get("FOXLAB_BROWSER_TIMEOUT_S", 300))
RENDER_TIMEOUT_S = 30  # widgets and plots drawn after the kernel went idle
REDRAW_TIMEOUT_S = 30  # a head change: kernel recompute + redraw
VIEWPORT = {"width": 1400, "height": 900}

ERROR_TEXT = re.compile(r"Traceback|\b\w*(?:Error|Exception):|Error displaying widget|Error rendering")

# Console messages at level "error" that are not faults of the notebooks or of foxlab:
BENIGN_CONSOLE_ERRORS = [
    # Chromium asks every page for /favicon.ico; JupyterLab sets its own icon, the server answers 404.
    re.compile(r"favicon\.ico"),
]


def _unavailable(reason: str):
    """Skip where the browser can't be had; under CI that is a failure, never a silent skip."""
    if os.environ.get("CI"):
        pytest.fail(f"browser tests cannot run and CI is set, so they fail instead of skipping: {reason}")
    pytest.skip(reason)


# --------------------------------------------------------------------------------------------------
# JupyterLab server
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _scratch_notebook():
    """A notebook made of the same parts as the foxlab ones, with nothing of foxlab: checks the harness."""
    import nbformat

    cells = [
        """\
        import sys, os
        import ipywidgets as widgets
        import plotly.graph_objects as go
        print(sys.executable, os.environ.get("FOXLAB_FAST"))""",
        """\
        fig = go.Figure([go.Scatter(y=[1, 3, 2], name="line"), go.Bar(y=[2, 1, 2], name="bars")])
        fig.update_layout(title="scratch: two traces", height=300)
        fig.show()""",
        """\
        class Explorer(widgets.VBox):  # the shape of foxlab.viz.Explorer: .head selects, .figure redraws
            def __init__(self):
                self.head = widgets.Dropdown(options=[0, 1, 2], value=0, description="head")
                self.figure = go.FigureWidget(layout=dict(title="scratch explorer", height=300))
                self.figure.add_heatmap(z=self._z(0))
                self.head.observe(lambda change: self.redraw(), names="value")
                super().__init__([self.head, self.figure])

            def _z(self, head):
                return [[(i * j + head) % 5 for j in range(6)] for i in range(6)]

            def redraw(self):
                self.figure.data[0].z = self._z(self.head.value)

        explorer = Explorer()
        explorer""",
        """\
        from tqdm.auto import tqdm
        for _ in tqdm(range(20), desc="scratch"):
            pass""",
    ]
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell("# Browser harness check")]
    nb.cells += [nbformat.v4.new_code_cell(textwrap.dedent(src)) for src in cells]
    return nb


def _copy_notebooks(root: Path) -> None:
    """notebooks/ into root, outputs cleared: whatever the browser shows was produced by this run."""
    import nbformat

    if NOTEBOOKS.is_dir():
        shutil.copytree(NOTEBOOKS, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "runs"))
    for path in root.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, path)
    nbformat.write(_scratch_notebook(), root / SCRATCH_NOTEBOOK)


def _write_lab_settings(settings: Path) -> None:
    def put(plugin: str, values: dict) -> None:
        path = settings / plugin
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    # No "get Jupyter news?" toast over the plots, and no request to the internet for it.
    put("@jupyterlab/apputils-extension/notification.jupyterlab-settings", {"fetchNews": "false", "checkForUpdates": False})
    # Every cell attached to the DOM: the default (contentVisibility) lets the browser skip laying out
    # cells out of view, which is what this test wants to see drawn.
    put("@jupyterlab/notebook-extension/tracker.jupyterlab-settings", {"windowingMode": "none"})


def _descendants(pid: int) -> dict[int, str]:
    """pid -> start time of every live descendant of pid (the server's kernels start their own session)."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        start[int(entry)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = start[child]
            todo.append(child)
    return found


def _still_same(pid: int, started: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[19] == started


class Lab:
    """A JupyterLab server this test started; `stop()` is safe to call whatever state it is in."""

    def __init__(self, tmp: Path):
        self.tmp, self.root = tmp, tmp / "root"
        self.root.mkdir()
        self.token = secrets.token_hex(16)
        self.log_path = tmp / "jupyterlab.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        venv_bin = str(Path(sys.executable).parent)
        self.env = dict(
            os.environ,
            PATH=venv_bin + os.pathsep + os.environ.get("PATH", ""),
            FOXLAB_FAST="1",
            # One OpenMP thread for the kernel: the browser needs the other core, and two torch threads
            # sharing two cores with other work made training steps up to 10x slower (see foxlab.train.demo).
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            MKL_NUM_THREADS=os.environ.get("MKL_NUM_THREADS", "1"),
            JUPYTER_CONFIG_DIR=str(tmp / "config"),
            JUPYTER_DATA_DIR=str(tmp / "data"),
            JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
            IPYTHONDIR=str(tmp / "ipython"),
            JUPYTERLAB_SETTINGS_DIR=str(tmp / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-workspaces"),
            PYTHONUNBUFFERED="1",
        )
        _write_lab_settings(tmp / "lab-settings")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, method: str, path: str, timeout: float = 10):
        req = urllib.request.Request(self.base + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> None:
        for _attempt in range(3):  # the free port may be taken between picking it and binding it
            self.port = _free_port()
            cmd = [
                sys.executable, "-m", "jupyterlab", "--no-browser",
                "--ip=127.0.0.1", f"--port={self.port}", "--ServerApp.port_retries=0",
                f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
                "--ServerApp.terminals_enabled=False",
                "--LabApp.expose_app_in_browser=True",  # window.jupyterapp: read cell models, kernel status
            ]  # fmt: skip
            if os.geteuid() == 0:
                cmd.append("--allow-root")
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    cmd, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,  # its own process group, killed as one
                )  # fmt: skip
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    self.api("GET", "/api/status", timeout=2)
                    return
                except (OSError, urllib.error.URLError):
                    time.sleep(0.3)
            if self.proc.poll() is None:
                raise RuntimeError(f"JupyterLab did not answer within {SERVER_START_TIMEOUT_S}s:\n{self.log_tail()}")
            if "already in use" not in self.log_tail():
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}:\n{self.log_tail()}")
        raise RuntimeError(f"JupyterLab found no free port:\n{self.log_tail()}")

    def shutdown_kernels(self) -> None:
        with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
            for session in self.api("GET", "/api/sessions"):
                self.api("DELETE", f"/api/sessions/{session['id']}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        kernels = _descendants(proc.pid)  # known now: they leave the server's tree when it exits
        if proc.poll() is None:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                self.api("POST", "/api/shutdown", timeout=5)  # stops its kernels too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the group
        for pid, started in kernels.items():
            if _still_same(pid, started):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def chromium_executable() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        _unavailable(f"playwright is not installed: {exc}")
    try:
        return find_chromium(log=lambda msg: print(msg, file=sys.stderr))
    except ChromiumUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="module")
def lab(chromium_executable):
    tmp = Path(tempfile.mkdtemp(prefix="foxlab-browser-"))
    server = None
    try:
        server = Lab(tmp)
        _copy_notebooks(server.root)
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(chromium_executable, lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # headless Chromium with a fresh, empty profile (Playwright makes one per launch)
        chromium = pw.chromium.launch(executable_path=chromium_executable, headless=True, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


# --------------------------------------------------------------------------------------------------
# One notebook in one page
# --------------------------------------------------------------------------------------------------

# Reads the notebook shown: per code cell, its prompt, outputs (model) and what is drawn (DOM).
REPORT_JS = """
() => {
  // points per trace (x, else y, else z rows); null where the data is encoded (bdata without shape)
  const size = (a) => a == null ? null : (Array.isArray(a) || ArrayBuffer.isView(a)) ? a.length
                    : (a.shape ? Number(String(a.shape).split(',')[0]) : null);
  const points = (traces) => (traces || []).map(t => size(t.x) ?? size(t.y) ?? size(t.z));
  const panel = window.jupyterapp.shell.currentWidget;
  const cells = [];
  panel.content.widgets.forEach((cell, index) => {
    if (cell.model.type !== 'code') return;
    const prompt = cell.node.querySelector('.jp-InputArea-prompt');
    const children = cell.outputArea.widgets;
    const outputs = [];
    for (let j = 0; j < cell.model.outputs.length; j++) {
      const out = cell.model.outputs.get(j).toJSON();
      const node = children[j] ? children[j].node : null;
      const plots = node ? [...node.querySelectorAll('.js-plotly-plot')] : [];
      const data = out.data || {};
      outputs.push({
        output_type: out.output_type,
        name: out.name || null,
        text: out.output_type === 'stream' ? String(out.text).slice(0, 4000)
            : out.output_type === 'error' ? `${out.ename}: ${out.evalue}` : null,
        mimes: Object.keys(data),
        plotly_traces: data['application/vnd.plotly.v1+json'] ? (data['application/vnd.plotly.v1+json'].data || []).length : null,
        plotly_points: data['application/vnd.plotly.v1+json'] ? points(data['application/vnd.plotly.v1+json'].data) : null,
        rendered_text: node ? [...node.querySelectorAll('.jp-RenderedText')].map(e => e.innerText.slice(0, 4000)) : [],
        stderr_dom: node ? [...node.querySelectorAll('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')].map(e => e.innerText.slice(0, 4000)) : [],
        loading_widgets: node ? (node.innerText.match(/Loading widget/g) || []).length : 0,
        images: node ? [...node.querySelectorAll('img.plot-img')].filter(i => i.style.display !== 'none' && i.naturalWidth > 0).length : 0,
        plots: plots.map(gd => {
          const svg = gd.querySelector('.main-svg');
          const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
          return {
            traces: gd.data ? gd.data.length : null,
            full_traces: gd._fullData ? gd._fullData.length : null,
            types: gd.data ? gd.data.map(t => t.type || 'scatter') : [],
            points: points(gd.data),
            drawn: gd.querySelectorAll('g.trace, g.hm, g.contour, .heatmaplayer image, .pielayer g.slice').length,
            width: box.width, height: box.height,
          };
        }),
        progress: node ? [...node.querySelectorAll('.widget-hprogress, .widget-vprogress')].map(e => {
          const bar = e.querySelector('.progress-bar');
          return {style: bar ? bar.className : '', width: bar ? bar.style.width : ''};
        }) : [],
      });
    }
    cells.push({index, prompt: prompt ? prompt.textContent.trim() : '', source: cell.model.sharedModel.getSource().slice(0, 200), outputs});
  });
  return cells;
}
"""

# The notebook is done when its kernel is idle and no cell waits to run ("[*]").
STATE_JS = """
() => {
  const panel = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.sessionContext) return {ready: false};
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  const indicator = panel.node.querySelector('.jp-Notebook-ExecutionIndicator');
  const prompts = [...panel.content.node.querySelectorAll('.jp-CodeCell .jp-InputArea-prompt')].map(p => p.textContent.trim());
  return {
    ready: true,
    kernel: kernel ? kernel.status : null,
    indicator: indicator ? indicator.getAttribute('data-status') : null,
    prompts,
  };
}
"""

# Runs code in the notebook's own kernel (its namespace) without touching the notebook; resolves stdout.
KERNEL_EXEC_JS = """
async (code) => {
  const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  let out = '', err = '';
  const future = kernel.requestExecute({code, silent: false, store_history: false});
  future.onIOPub = (msg) => {
    if (msg.header.msg_type === 'stream') out += msg.content.text;
    if (msg.header.msg_type === 'error') err += msg.content.ename + ': ' + msg.content.evalue;
  };
  await future.done;
  return {out, err};
}
"""

# Finds what the notebook shows from the kernel side: its explorer (an object whose .head and .figure
# are widgets, as foxlab.viz.Explorer) and every plotly FigureWidget; prints them as JSON.
KERNEL_PROBE = textwrap.dedent(
    """\
    def _browser_probe():
        import gc, json, os, sys
        import ipywidgets
        import plotly.graph_objects as go
        from ipywidgets.widgets.widget import _instances
        widgets = list(_instances.values())
        explorer = next((w for w in widgets if isinstance(getattr(w, "head", None), ipywidgets.Widget)
                         and isinstance(getattr(w, "figure", None), go.FigureWidget)), None)
        figures = [w for w in widgets if isinstance(w, go.FigureWidget)]
        info = {"executable": sys.executable, "prefix": sys.prefix, "FOXLAB_FAST": os.environ.get("FOXLAB_FAST"),
                "figures": [{"traces": len(f.data), "types": [t.type for t in f.data]} for f in figures]}
        if explorer is not None:
            head = explorer.head
            info["explorer"] = {
                "type": type(explorer).__module__ + "." + type(explorer).__qualname__,
                "head": {"widget": type(head).__name__, "description": head.description,
                         "options": [str(o[0] if isinstance(o, tuple) else o) for o in getattr(head, "options", [])],
                         "value": str(head.value), "disabled": bool(getattr(head, "disabled", False))},
                "figure": {"traces": len(explorer.figure.data), "types": [t.type for t in explorer.figure.data]},
            }
        print("BROWSER-PROBE " + json.dumps(info))
    _browser_probe()
    del _browser_probe
    """
)


# A fingerprint of every plot in the cell holding the explorer's head selector.
def _plots_fingerprint_js(description: str) -> str:
    return (
        """
() => {
  const label = [...document.querySelectorAll('.jp-Notebook .widget-label')].find(l => l.textContent.trim() === DESC);
  if (!label) return null;
  const cell = label.closest('.jp-Cell');
  return [...cell.querySelectorAll('.js-plotly-plot')].map(gd => {
    const s = JSON.stringify((gd.data || []).map(t => [t.type, t.name, t.x, t.y, t.z, t.text]));
    let h = 2166136261;
    for (let i = 0; i < s.length; i++) { h ^= s.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    return {traces: (gd.data || []).length, hash: h, size: s.length};
  });
}
""".replace("DESC", json.dumps(description))
    )


class NotebookPage:
    def __init__(self, lab: Lab, page, capsys):
        self.lab, self.page, self.capsys = lab, page, capsys
        self.errors: list[str] = []
        self.name = ""
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", self._on_console)

    def _on_console(self, msg) -> None:
        if msg.type != "error":
            return
        text = f"console.error: {msg.text}"
        location = msg.location or {}
        where = f"{text} ({location.get('url', '')})"
        if not any(pattern.search(where) for pattern in BENIGN_CONSOLE_ERRORS):
            self.errors.append(where)

    def say(self, message: str) -> None:
        with self.capsys.disabled():
            print(f"\n[browser] {message}", flush=True)

    def screenshot(self, suffix: str, *, whole_notebook: bool = False) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{Path(self.name).stem}-{suffix}.png"
        if whole_notebook:  # a viewport as tall as the notebook, so the shot shows every cell
            # the notebook's scroll container is taller than its box by what is out of view
            extra = self.page.evaluate(
                "() => { const n = window.jupyterapp.shell.currentWidget.content.node;"
                " const s = n.querySelector('.jp-WindowedPanel-outer') || n;"
                " s.scrollTop = 0; return s.scrollHeight - s.clientHeight; }"
            )
            height = VIEWPORT["height"] + int(extra) + 40
            self.page.set_viewport_size({"width": VIEWPORT["width"], "height": min(height, 16000)})
            self.page.wait_for_timeout(1000)  # plotly relayouts on resize
            self.page.screenshot(path=str(path), full_page=True)
            self.page.set_viewport_size(VIEWPORT)
            self.page.wait_for_timeout(300)
        else:
            self.page.screenshot(path=str(path), full_page=True)
        self.say(f"screenshot: {path}")
        return path

    def state(self) -> dict:
        return self.page.evaluate(STATE_JS)

    def open(self, name: str) -> None:
        self.name = name
        self.page.goto(f"{self.lab.base}/lab/tree/{name}?reset&token={self.lab.token}")
        self.page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=NOTEBOOK_OPEN_TIMEOUT_S * 1000)
        deadline = time.monotonic() + NOTEBOOK_OPEN_TIMEOUT_S
        while True:
            # A notebook without kernel metadata asks which kernel: take the default (python3).
            dialog = self.page.locator(".jp-Dialog .jp-mod-accept")
            if dialog.count():
                dialog.first.click()
            state = self.state()
            if state.get("kernel") == "idle" and state.get("indicator") == "idle":
                break
            assert time.monotonic() < deadline, f"kernel not idle {NOTEBOOK_OPEN_TIMEOUT_S}s after opening {name}: {state}"
            self.page.wait_for_timeout(250)
        # The file browser closed: the notebook gets the width, as a reader would have it.
        self.page.evaluate("() => window.jupyterapp.shell.collapseLeft()")

    def run_all(self) -> float:
        """Run > Run All Cells, through the menu as a person would; returns the seconds until idle."""
        started = time.monotonic()
        self.page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        self.page.locator(".lm-Menu-content .lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        seen_busy = False
        while True:
            state = self.state()
            busy = state["kernel"] != "idle" or state["indicator"] != "idle" or "[*]:" in state["prompts"]
            seen_busy |= busy or any(p not in ("[ ]:", "") for p in state["prompts"])
            if seen_busy and not busy:
                break
            elapsed = time.monotonic() - started
            if elapsed > RUN_ALL_TIMEOUT_S:
                self.screenshot("timeout", whole_notebook=True)
                running = [i for i, p in enumerate(state["prompts"]) if p == "[*]:"][:1]
                raise AssertionError(
                    f"{self.name}: not done after {RUN_ALL_TIMEOUT_S:.0f}s (FOXLAB_BROWSER_TIMEOUT_S); code cell "
                    f"#{running[0] + 1 if running else '?'} still running: {state}"
                )
            self.page.wait_for_timeout(500)
        return time.monotonic() - started

    def report(self) -> list[dict]:
        """Waits (bounded) for widgets and plots to be drawn, then reads every code cell."""
        deadline = time.monotonic() + RENDER_TIMEOUT_S
        while True:
            cells = self.page.evaluate(REPORT_JS)
            outputs = [o for c in cells for o in c["outputs"]]
            pending = sum(o["loading_widgets"] for o in outputs)
            pending += sum(1 for o in outputs if o["plotly_traces"] is not None and not o["plots"])
            pending += sum(1 for o in outputs for p in o["plots"] if not p["width"] or p["traces"] is None)
            if not pending or time.monotonic() > deadline:
                return cells
            self.page.wait_for_timeout(500)

    def kernel(self, code: str) -> str:
        result = self.page.evaluate(KERNEL_EXEC_JS, code)
        assert not result["err"], f"probe code failed in the kernel: {result['err']}"
        return result["out"]

    def probe(self) -> dict:
        out = self.kernel(KERNEL_PROBE)
        line = next(line for line in out.splitlines() if line.startswith("BROWSER-PROBE "))
        return json.loads(line.removeprefix("BROWSER-PROBE "))


@pytest.fixture
def notebook_page(lab, browser, capsys):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    context.set_default_timeout(30_000)
    page = context.new_page()
    nbpage = NotebookPage(lab, page, capsys)
    try:
        yield nbpage
    finally:
        with contextlib.suppress(Exception):
            context.close()
        lab.shutdown_kernels()  # the next notebook gets the CPU


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def assert_no_errors(cells: list[dict], name: str) -> None:
    problems = []
    for cell in cells:
        where = f"{name} cell {cell['index']} ({cell['source'][:60]!r})"
        if not re.fullmatch(r"\[\d+\]:", cell["prompt"]):
            problems.append(f"{where}: did not run (prompt {cell['prompt']!r})")
        for out in cell["outputs"]:
            if out["output_type"] == "error":
                problems.append(f"{where}: error output {out['text']}")
            if out["name"] == "stderr" and ERROR_TEXT.search(out["text"] or ""):
                problems.append(f"{where}: stderr {out['text'][-800:]}")
            for text in out["stderr_dom"] + out["rendered_text"]:
                if ERROR_TEXT.search(text):
                    problems.append(f"{where}: shows {text[-800:]}")
            if out["loading_widgets"]:
                problems.append(f"{where}: widget never rendered ('Loading widget...')")
    assert not problems, "\n".join(dict.fromkeys(problems))


def assert_plots_drawn(cells: list[dict], probe: dict, name: str) -> list[dict]:
    """Every plotly output drawn with the traces Python sent; widget plots match a kernel FigureWidget."""
    plots, problems = [], []
    kernel_figures = [(f["traces"], f["types"]) for f in probe["figures"]]
    for cell in cells:
        for out in cell["outputs"]:
            where = f"{name} cell {cell['index']} ({cell['source'][:60]!r})"
            if out["plotly_traces"] is not None and out["images"] and not out["plots"]:
                # jupyterlab-plotly shows a bundle's image/png instead of the plot when the PNG is there
                # before the plot is drawn (the plot comes only when the mouse enters the image)
                problems.append(f"{where}: a plotly output shown as a static PNG, not as an interactive plot")
            elif out["plotly_traces"] is not None and len(out["plots"]) != 1:
                problems.append(f"{where}: a plotly output drawn as {len(out['plots'])} plots")
            for plot in out["plots"]:
                plots.append(plot)
                if not (plot["width"] > 50 and plot["height"] > 50):
                    problems.append(f"{where}: plot not laid out ({plot['width']}x{plot['height']})")
                if not plot["traces"] or plot["full_traces"] != plot["traces"]:
                    problems.append(f"{where}: plot has traces={plot['traces']} fullData={plot['full_traces']}")
                if plot["traces"] and not plot["drawn"]:
                    problems.append(f"{where}: no trace drawn in the SVG ({plot['types']})")
                if out["plotly_traces"] is not None:
                    expected = out["plotly_traces"]
                    stale = [(i, shown, sent) for i, (shown, sent) in enumerate(zip(plot["points"], out["plotly_points"]))
                             if shown is not None and sent is not None and shown != sent]  # fmt: skip
                    if stale:
                        # e.g. a display updated in place: jupyterlab-plotly keeps a plot once drawn and ignores
                        # later updates of the output, so the page shows the first version of the figure
                        problems.append(f"{where}: the page shows an old version of the figure: (trace, points "
                                        f"drawn, points in the output) {stale}")
                elif "application/vnd.jupyter.widget-view+json" in out["mimes"]:
                    match = [n for n, types in kernel_figures if n == plot["traces"] and types == plot["types"]]
                    expected = match[0] if match else f"one of the kernel's FigureWidgets {kernel_figures}"
                else:
                    expected = plot["traces"]  # plotly drawn from HTML: nothing else to compare with
                if plot["traces"] != expected:
                    problems.append(f"{where}: browser draws {plot['traces']} traces {plot['types']}, expected {expected}")
    assert not problems, "\n".join(problems)
    return plots


def assert_no_page_errors(nbpage: NotebookPage) -> None:
    assert not nbpage.errors, "JavaScript errors in the page:\n" + "\n".join(nbpage.errors)


def change_head_and_check_redraw(nbpage: NotebookPage, probe: dict) -> str:
    """Pick another option in the explorer's head selector; the kernel and the plot must follow."""
    page, head = nbpage.page, probe["explorer"]["head"]
    assert not head["disabled"], f"the explorer's head selector is disabled: {head}"
    assert len(head["options"]) >= 2, f"the head selector has fewer than two options: {head}"
    new_value = next(o for o in head["options"] if o != head["value"])
    fingerprint = _plots_fingerprint_js(head["description"])
    before = page.evaluate(fingerprint)
    assert before, f"no explorer plot in the cell of the widget labelled {head['description']!r}"
    label = page.locator(".jp-Notebook .widget-label", has_text=re.compile("^" + re.escape(head["description"]) + "$"))
    control = label.first.locator("xpath=..")  # the widget the label belongs to, not the boxes around it
    if head["widget"] in ("Dropdown", "Select"):
        control.locator("select").first.select_option(label=new_value)
    elif head["widget"] == "ToggleButtons":
        control.locator("button", has_text=re.compile("^" + re.escape(new_value) + "$")).first.click()
    elif "Slider" in head["widget"]:
        handle = control.locator(".noUi-handle").first
        handle.focus()
        handle.press("ArrowRight" if head["options"].index(head["value"]) + 1 < len(head["options"]) else "ArrowLeft")
    else:
        raise AssertionError(f"don't know how to drive a {head['widget']} head selector")

    deadline, last = time.monotonic() + REDRAW_TIMEOUT_S, None
    while True:
        after = page.evaluate(fingerprint)
        if after != before and after == last and nbpage.state()["kernel"] == "idle":
            break  # changed, and settled: the same twice with the kernel idle
        last = after
        assert time.monotonic() < deadline, (
            f"changing the head to {new_value} did not redraw the explorer's plot in {REDRAW_TIMEOUT_S}s: {before}"
        )
        page.wait_for_timeout(300)
    now = nbpage.probe()["explorer"]
    if "Slider" not in head["widget"]:
        assert now["head"]["value"] == new_value, f"the kernel's head is {now['head']['value']}, the page chose {new_value}"
    assert now["head"]["value"] != head["value"], "the kernel's head did not change"
    assert now["figure"]["traces"] in [p["traces"] for p in after], f"browser plots {after} vs kernel figure {now['figure']}"
    return f"head {head['value']} -> {now['head']['value']}: plot {before} -> {after}"


def run_notebook(nbpage: NotebookPage, name: str, *, explorer: bool) -> tuple[list[dict], dict]:
    """Open, Run All, check; screenshots. Returns the cells report and the kernel probe."""
    try:
        started = time.monotonic()
        nbpage.open(name)
        opened = time.monotonic() - started
        ran = nbpage.run_all()
        cells = nbpage.report()
        nbpage.screenshot("lab")
        nbpage.screenshot("notebook", whole_notebook=True)
        probe = nbpage.probe()
        nbpage.say(f"{name}: opened in {opened:.1f}s, Run All took {ran:.1f}s; kernel {probe['executable']}")
        assert probe["prefix"] == sys.prefix, f"the kernel runs {probe['executable']}, not this venv's python ({sys.prefix})"
        assert probe["FOXLAB_FAST"] == "1", "the kernel did not get FOXLAB_FAST=1"
        assert_no_errors(cells, name)
        plots = assert_plots_drawn(cells, probe, name)
        nbpage.say(f"{name}: {len(plots)} plots drawn, traces {[p['traces'] for p in plots]}")
        if explorer:
            assert "explorer" in probe, f"{name}: no explorer (an object with .head and .figure widgets) in the kernel"
            change = change_head_and_check_redraw(nbpage, probe)
            nbpage.say(f"{name}: explorer {probe['explorer']['type']}: {change}")
            nbpage.page.locator(".jp-Notebook .widget-label", has_text=re.compile(
                "^" + re.escape(probe["explorer"]["head"]["description"]) + "$")).first.scroll_into_view_if_needed()  # fmt: skip
            nbpage.screenshot("after-head-change")
            assert_no_errors(nbpage.report(), name)
        assert_no_page_errors(nbpage)
        return cells, probe
    except BaseException:
        with contextlib.suppress(Exception):
            nbpage.screenshot("failure")
        raise


def _real_notebook(name: str) -> None:
    """Skips (also under CI) while the notebook is not in the repo yet."""
    if not (NOTEBOOKS / name).exists():
        pytest.skip(f"notebooks/{name} is not written yet")


def _needs_notebook(name: str):
    """The same, decided before any fixture starts a server or a browser."""
    return pytest.mark.skipif(not (NOTEBOOKS / name).exists(), reason=f"notebooks/{name} is not written yet")


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_harness_on_scratch_notebook(notebook_page):
    """The harness on a notebook with no foxlab in it: a figure, an explorer-shaped widget, a tqdm bar."""
    cells, probe = run_notebook(notebook_page, SCRATCH_NOTEBOOK, explorer=True)
    plots = [p for c in cells for o in c["outputs"] for p in o["plots"]]
    assert [p["traces"] for p in plots] == [2, 1]
    progress = [bar for c in cells for o in c["outputs"] for bar in o["progress"]]
    assert progress and "progress-bar-success" in progress[0]["style"], f"tqdm bar not shown as complete: {progress}"


@_needs_notebook(VIZ_NOTEBOOK)
def test_visualizing_forgetting_notebook(notebook_page):
    cells, probe = run_notebook(notebook_page, VIZ_NOTEBOOK, explorer=True)
    assert probe["explorer"]["type"] == "foxlab.viz.Explorer"
    assert any(o["plots"] for c in cells for o in c["outputs"] if o["plotly_traces"] is not None), "no plotly figure"


@_needs_notebook(TRAIN_NOTEBOOK)
def test_train_a_small_fox_notebook(notebook_page):
    cells, _probe = run_notebook(notebook_page, TRAIN_NOTEBOOK, explorer=False)
    plots = [p for c in cells for o in c["outputs"] for p in o["plots"]]
    assert plots, f"{TRAIN_NOTEBOOK}: no plot drawn (the loss curve)"
    bars = [bar for c in cells for o in c["outputs"] for bar in o["progress"]]
    text_bars = [o["text"] for c in cells for o in c["outputs"] if o["name"] == "stderr" and "100%" in (o["text"] or "")]
    assert bars or text_bars, f"{TRAIN_NOTEBOOK}: no tqdm progress bar shown"
    assert all("progress-bar-danger" not in bar["style"] for bar in bars), f"a progress bar stopped early: {bars}"


# More notebooks on demand, e.g. FOXLAB_BROWSER_NOTEBOOKS=01_forget_gate_math.ipynb,03_model_and_huggingface.ipynb
EXTRA_NOTEBOOKS = [n for n in os.environ.get("FOXLAB_BROWSER_NOTEBOOKS", "").split(",") if n.strip()]


if EXTRA_NOTEBOOKS:

    @pytest.mark.parametrize("name", [n.strip() for n in EXTRA_NOTEBOOKS])
    def test_more_notebooks(notebook_page, name):
        _real_notebook(name)
        run_notebook(notebook_page, name, explorer=False)
