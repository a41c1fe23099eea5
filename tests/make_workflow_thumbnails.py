"""Write ``example_workflows/<name>.jpg`` for every example workflow: the thumbnail ComfyUI's
Templates browser shows for a custom node pack's workflow (it asks for
``/api/workflow_templates/<pack>/<name>.jpg``, and shows a placeholder without it).

Each thumbnail is a screenshot of the workflow as ComfyUI's own front-end draws it: a real ComfyUI
server with this pack (``COMFYUI_PATH``, as the tests find it) and headless Chromium, the graph fitted
to the view with the menus hidden, scaled down and saved as JPEG with Pillow. Run it by hand after
changing a workflow:

    COMFYUI_PATH=/path/to/ComfyUI python tests/make_workflow_thumbnails.py [--out DIR] [names ...]
"""

from __future__ import annotations

import argparse
import io
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from comfy_server import (
    ROOT,
    ComfyServer,
    browser_missing,
    fit_view,
    launch_chromium,
    load_workflow,
    open_app,
    write_workflow_inputs,
)

VIEWPORT = (1440, 900)  # the page the graph is drawn in (CSS pixels)
SIZE = (640, 400)  # the thumbnail: 16:10, as the Templates browser's cards
MAX_BYTES = 60_000
# full detail at any zoom (a large graph is drawn below the level-of-detail threshold), no fps counter
SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Graph.CanvasInfo": False}
# only the canvas and the widgets drawn as HTML over it (text boxes, notes) stay visible
CANVAS_ONLY_CSS = """
body * { visibility: hidden !important; }
canvas.lgraphcanvas, .dom-widget, .dom-widget * { visibility: visible !important; }
"""


def encode_jpeg(png: bytes, size: tuple[int, int] = SIZE, max_bytes: int = MAX_BYTES) -> bytes:
    """The screenshot scaled to ``size`` as a JPEG of at most ``max_bytes`` (lowering the quality if needed)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    for quality in (85, 80, 75, 70, 60, 50):
        out = io.BytesIO()
        image.save(out, "JPEG", quality=quality, optimize=True, progressive=True)
        if out.tell() <= max_bytes:
            return out.getvalue()
    raise ValueError(f"cannot get a {size[0]}x{size[1]} thumbnail under {max_bytes} bytes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="workflow names (default: every example_workflows/*.json)")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "example_workflows", help="where the .jpg files go")
    args = parser.parse_args(argv)

    from comfy_harness import COMFYUI, COMFYUI_IMPORT_ERROR, SKIP_REASON

    if COMFYUI is None:
        parser.error(COMFYUI_IMPORT_ERROR or SKIP_REASON)
    if browser_missing():
        parser.error(browser_missing())
    workflows = sorted((ROOT / "example_workflows").glob("*.json"))
    if args.names:
        unknown = set(args.names) - {p.stem for p in workflows}
        if unknown:
            parser.error(f"no example workflow named {sorted(unknown)}; there are {[p.stem for p in workflows]}")
        workflows = [p for p in workflows if p.stem in args.names]
    args.out.mkdir(parents=True, exist_ok=True)

    import json

    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="d2f_thumbnails_") as tmp:
        base = pathlib.Path(tmp)
        write_workflow_inputs(base, workflows)
        with ComfyServer(COMFYUI, base) as server, sync_playwright() as pw:
            browser = launch_chromium(pw)
            try:
                page = open_app(browser, server, viewport=VIEWPORT, settings=SETTINGS)
                page.add_style_tag(content=CANVAS_ONLY_CSS)
                for path in workflows:
                    load_workflow(page, json.loads(path.read_text()), path.stem)
                    fit_view(page, zoom=0.95)
                    page.wait_for_timeout(500)  # a few frames: the canvas draws on the next animation frame
                    jpeg = encode_jpeg(page.screenshot(type="png"))
                    (args.out / f"{path.stem}.jpg").write_bytes(jpeg)
                    print(f"{args.out / (path.stem + '.jpg')}: {len(jpeg)} bytes")
            finally:
                browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
