"""A real ComfyUI server with this pack installed, and a headless Chromium page on it.

Used by tests/test_browser.py and tests/make_workflow_thumbnails.py. The server runs ComfyUI's own
``main.py`` (``COMFYUI_PATH``, see comfy_harness) as a subprocess on a free loopback port, with a
temporary ``--base-directory`` whose ``custom_nodes/`` links to this repository, so nothing is
written into the ComfyUI tree or this checkout. The browser is the system Chromium driven by
Playwright for Python (``executable_path``; Playwright's own browser download is never used), and
the page may only reach the server: every other request is aborted.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACK_NAME = "diff2flow"  # the folder name in custom_nodes/: the front-end serves web/ under /extensions/<it>/
CHROMIUM = pathlib.Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
START_TIMEOUT_S = 120.0  # import of ComfyUI + its nodes on a slow 2-core machine takes ~15 s
# front-end settings stored on the server before the page opens: no first-run template browser, no minimap
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}
APP_READY = (
    "() => !!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager && window.LiteGraph)"
)


MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# ComfyUI's dataset loaders: their `folder` combo lists the subfolders of input/
DATASET_FOLDER_TYPES = {"LoadImageTextDataSetFromFolder", "LoadImageDataSetFromFolder"}


# no proxy for the loopback server, whatever http_proxy says: the tests talk to 127.0.0.1 only
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The ComfyUI server did not start, or the pack failed to import into it (the log tail says why)."""


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when Playwright and Chromium are available)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed: pip install playwright (its browser download is not needed)"
    if not CHROMIUM.is_file():
        return f"Chromium not found at {CHROMIUM}: apt-get install chromium, or set CHROMIUM_PATH to a Chromium binary"
    return None


def write_workflow_inputs(base: pathlib.Path, workflows: Iterable[pathlib.Path]) -> None:
    """The files the example workflows name, so that their file combos list them: an empty model
    file per model name (checkpoints and loras), a grey gradient PNG per image name, a folder per dataset."""
    from PIL import Image

    for sub in ("models/checkpoints", "models/loras", "input"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for path in workflows:
        for node in json.loads(path.read_text())["nodes"]:
            for value in node.get("widgets_values") or []:
                if not isinstance(value, str) or not value or "/" in value or "\\" in value:
                    continue
                if value.endswith(MODEL_EXTENSIONS):
                    for sub in ("models/checkpoints", "models/loras"):
                        (base / sub / value).touch()
                elif value.lower().endswith(IMAGE_EXTENSIONS):
                    Image.linear_gradient("L").convert("RGB").save(base / "input" / value)
                elif node["type"] in DATASET_FOLDER_TYPES:
                    (base / "input" / value).mkdir(exist_ok=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def link_pack(base: pathlib.Path) -> pathlib.Path:
    """``<base>/custom_nodes/<PACK_NAME>`` -> this repository (a symlink: the served files are the checkout's)."""
    custom_nodes = base / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    link = custom_nodes / PACK_NAME
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    return link


class ComfyServer:
    """``python main.py --cpu`` from the ComfyUI tree on ``127.0.0.1:<free port>``; a context manager
    that always stops the process. ``base`` is the ``--base-directory`` (models/, input/, output/,
    user/, custom_nodes/); put model files there before entering."""

    def __init__(self, comfyui: pathlib.Path, base: pathlib.Path, timeout_s: float = START_TIMEOUT_S):
        self.comfyui = pathlib.Path(comfyui)
        self.base = pathlib.Path(base)
        self.timeout_s = timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "comfyui.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ComfyServer:
        link_pack(self.base)
        env = dict(os.environ)
        # this checkout's d2f_core / training, not an installed copy (ComfyUI's own folder stays first on
        # sys.path as the script's directory, so its nodes.py still wins over this pack's nodes/)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        cmd = [
            sys.executable,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--base-directory",
            str(self.base),
            "--database-url",
            "sqlite:///:memory:",
            "--disable-api-nodes",
            "--disable-auto-launch",
        ]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _fail(self, why: str) -> ServerError:
        tail = "\n".join(self.log().splitlines()[-40:])
        return ServerError(f"{why} (command run in {self.comfyui}; last lines of {self.log_path}):\n{tail}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"ComfyUI exited with code {self.proc.returncode} while starting")
            try:
                with _LOCAL.open(self.url + "/api/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        else:
            raise self._fail(f"ComfyUI did not answer on {self.url} within {self.timeout_s:.0f} s")
        if "IMPORT FAILED" in self.log():
            raise self._fail("a custom node failed to import into ComfyUI")
        if "D2F_TrainLoRA" not in self.get_json("/api/object_info/D2F_TrainLoRA"):
            raise self._fail("the Diff2Flow nodes are not registered in the server")

    # -- HTTP helpers (loopback only) ---------------------------------------------------------
    def request(self, path: str, data: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        """(status, headers, body) of GET ``path`` (POST of JSON ``data`` when given); errors are returned, not raised."""
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(
            self.url + path,
            data=body,
            method="GET" if data is None else "POST",
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with _LOCAL.open(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get_json(self, path: str) -> Any:
        status, _, body = self.request(path)
        if status != 200:
            raise self._fail(f"GET {path} answered {status}: {body[:300]!r}")
        return json.loads(body)

    def store_settings(self, settings: dict) -> None:
        status, _, body = self.request("/api/settings", settings)
        if status != 200:
            raise self._fail(f"POST /api/settings answered {status}: {body[:300]!r}")


def loopback_only(page: Any, base_url: str) -> list[str]:
    """Abort every request of ``page`` that does not go to ``base_url`` (the front-end asks some
    internet services, e.g. for release notes); returns the list the aborted URLs are appended to."""
    blocked: list[str] = []

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(base_url + "/") or url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(url)
            r.abort()

    page.route("**/*", route)
    return blocked


def launch_chromium(playwright: Any) -> Any:
    # --no-sandbox: the tests may run as root in a container, where Chromium's sandbox refuses to start
    return playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        headless=True,
        args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-proxy-server"],
    )


def open_app(
    browser: Any,
    server: ComfyServer,
    viewport: tuple[int, int] = (1600, 1000),
    init_script: str = "",
    settings: dict | None = None,
    timeout_s: float = 60,
) -> Any:
    """A new page with the ComfyUI front-end loaded from ``server`` and its app ready; ``settings``
    are front-end settings stored on the server first (on top of PAGE_SETTINGS)."""
    server.store_settings({**PAGE_SETTINGS, **(settings or {})})
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    page.blocked_urls = loopback_only(page, server.url)
    if init_script:
        page.add_init_script(init_script)
    page.goto(server.url + "/", timeout=timeout_s * 1000)
    page.wait_for_function(APP_READY, timeout=timeout_s * 1000)
    return page


LOAD_WORKFLOW = """async ([wf, name]) => {
  await window.app.loadGraphData(wf, true, true, name);
  window.app.canvas.deselectAll?.();
  window.app.canvas.setDirty(true, true);
}"""
FIT_VIEW = """(zoom) => {
  // the bounding box of every node (title bar included) and group, then LiteGraph's own fit
  const app = window.app, title = window.LiteGraph.NODE_TITLE_HEIGHT;
  const boxes = [...app.graph._nodes.map((n) => [n.pos[0], n.pos[1] - title, n.size[0], n.size[1] + title]),
                 ...(app.graph._groups || []).map((g) => [...(g.pos ?? g._pos), ...(g.size ?? g._size)])];
  const x0 = Math.min(...boxes.map((b) => b[0])), y0 = Math.min(...boxes.map((b) => b[1]));
  const x1 = Math.max(...boxes.map((b) => b[0] + b[2])), y1 = Math.max(...boxes.map((b) => b[1] + b[3]));
  app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom });
  app.canvas.setDirty(true, true);
}"""


def load_workflow(page: Any, workflow: dict, name: str) -> None:
    """Load a UI-format workflow the way the front-end opens a file (``app.loadGraphData``)."""
    page.evaluate(LOAD_WORKFLOW, [workflow, name])


def fit_view(page: Any, zoom: float = 0.95) -> None:
    """Zoom and pan the canvas so the whole graph fills ``zoom`` of the view."""
    page.evaluate(FIT_VIEW, zoom)
