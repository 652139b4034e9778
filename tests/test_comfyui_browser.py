"""The web extension in a real browser: live stats and a player on the writer node while it runs.

Skipped unless COMFYUI_DIR points at a ComfyUI checkout and a Chromium binary is found (CHROMIUM,
or chromium / chromium-browser / google-chrome on PATH). The ComfyUI server is started as in
test_comfyui_server.py; a headless Chromium with a fresh profile talks to it on 127.0.0.1 only
and is driven over the DevTools protocol with aiohttp (which ComfyUI itself needs). The page
loads the basic example workflow into the canvas and its small API twin is queued through
POST /prompt for this page's client id, as the frontend's Queue button does. Screenshots go to
LIVEAVATAR_SCREENSHOTS when it is set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.test_comfyui_server import (  # noqa: F401  (server and object_info are fixtures)
    COMFYUI_DIR, UI_FILES, _post, _served_graph, _small, _writer_id, object_info, server, ui_to_api,
)
from tests.test_workflows import node_boxes, overlaps

CHROMIUM = os.environ.get("CHROMIUM") or next(
    (found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))), None)
pytestmark = [
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run"),
    pytest.mark.skipif(not CHROMIUM, reason="no Chromium binary (set CHROMIUM)"),
]
# Flags that keep a headless Chromium off the network: only the pages we open are fetched.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=1600,1000")
START_S = 60
RUN_S = 600
WRITER = "LiveAvatarVideoWriter"


class Page:
    """The few DevTools calls the test needs, on one page target."""

    def __init__(self, ws):
        self.ws, self.last_id = ws, 0
        self.console: list[str] = []  # console errors and uncaught exceptions, as text

    def _record(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.console.append(details.get("exception", {}).get("description") or details.get("text", ""))

    async def call(self, method: str, **params) -> dict:
        self.last_id += 1
        call_id = self.last_id
        await self.ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            self._record(message)
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message["result"]

    async def eval(self, expression: str):
        """The JSON value of `expression` (awaited if it is a promise)."""
        result = await self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def until(self, expression: str, timeout_s: float, what: str):
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            value = await self.eval(expression)
            if value:
                return value
            await asyncio.sleep(0.2)
        await self.screenshot("timeout")
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; the node showed "
                             f"{await self.eval(VIEW)}")

    async def screenshot(self, name: str) -> None:
        folder = os.environ.get("LIVEAVATAR_SCREENSHOTS")
        if folder:
            data = (await self.call("Page.captureScreenshot", format="png"))["data"]
            Path(folder).mkdir(parents=True, exist_ok=True)
            Path(folder, f"{name}.png").write_bytes(base64.b64decode(data))


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """DevTools HTTP address of a headless Chromium with a fresh profile."""
    profile = tmp_path_factory.mktemp("chromium_profile")
    proc = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.time() + START_S
    while not port_file.is_file() or not port_file.read_text().strip():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"Chromium did not start ({CHROMIUM})")
        time.sleep(0.2)
    yield f"http://127.0.0.1:{port_file.read_text().split()[0]}"
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


# What the writer node shows: ComfyUI's progress text (the live stats the node sends), the
# extension's live player, ComfyUI's own player of the finished file, and whether all fit the node.
VIEW = f"""(() => {{
  const node = app.graph.nodes.find(n => n.comfyClass === "{WRITER}");
  const view = node.liveAvatarView;
  const video = view?.video;
  const widget = name => node.widgets?.find(w => w.name === name);
  const finished = widget("video-preview")?.element?.querySelector("video");
  return {{
    stats: widget("$$node-text-preview")?.value ?? null,
    caption: view ? view.caption.textContent : null,
    live: view ? {{
      src: video.getAttribute("src"), ready: video.readyState, duration: video.duration,
      width: video.getBoundingClientRect().width, height: video.getBoundingClientRect().height,
    }} : null,
    finished: finished ? {{ src: finished.getAttribute("src"), ready: finished.readyState }} : null,
    health: node.liveAvatarHealth ? {{
      src: node.liveAvatarHealth.img.getAttribute("src"), width: node.liveAvatarHealth.img.naturalWidth,
      shown: node.liveAvatarHealth.img.getBoundingClientRect().height,
    }} : null,
    fits: node.widgets.every(w => w.y + (w.computedHeight ?? 0) <= node.size[1] + 1),
    // A copy: newer frontends hand out a reactive view that does not serialise by itself.
    outputs: JSON.parse(JSON.stringify(app.nodeOutputs?.[String(node.id)] ?? null)),
  }};
}})()"""


async def _drive(devtools: str, url: str, graph: dict, prompt: dict) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.put(f"{devtools}/json/new?about:blank") as response:
            target = await response.json()
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1,
                            mobile=False)
            # Listen before the page loads: extensions register while it starts.
            await page.call("Runtime.enable")
            await page.call("Page.enable")
            # Room for every script the UI loads (the default buffer of 250 entries fills up).
            await page.call("Page.addScriptToEvaluateOnNewDocument",
                            source="performance.setResourceTimingBufferSize(100000)")
            await page.call("Page.navigate", url=url)
            await page.until("window.app?.graph && window.app.extensions?.some(e => e.name === 'liveavatar.writer')",
                             START_S, "the UI with the Live Avatar extension")
            await page.eval(f"app.loadGraphData({json.dumps(graph)})")
            await page.until(f"app.graph.nodes.some(n => n.comfyClass === '{WRITER}')", 30, "the workflow")
            await page.screenshot("0_loaded")
            client_id = await page.eval("window.comfyAPI.api.api.clientId")
            body = {"prompt": prompt, "client_id": client_id, "extra_data": {"extra_pnginfo": {"workflow": graph}}}
            queued = await page.eval(f"""fetch("{url}/prompt", {{method: "POST",
                headers: {{"Content-Type": "application/json"}}, body: JSON.stringify({json.dumps(body)})}})
                .then(r => r.json())""")
            assert "prompt_id" in queued, queued
            running = await page.until(f"(v => v.live && v.live.ready >= 1 && v.live.duration > 0 && v)({VIEW})",
                                       RUN_S, "live stats and a playable partial MP4 on the writer node")
            await page.screenshot("1_running")
            done = await page.until(f"(v => v.finished && v.finished.ready >= 1 && v.health && v.health.width > 0"
                                    f" && v.health.shown > 0 && v)({VIEW})", RUN_S,
                                    "ComfyUI's player of the finished MP4 and the health plot")
            # A widget that fails to draw stops the whole canvas (the nodes after it vanish).
            assert await page.eval("(() => { try { app.canvas.draw(true, true); return true; } "
                                   "catch (e) { return String(e); } })()") is True
            await page.screenshot("2_done")
            file = done["outputs"]["images"][0]
            view_url = f"{url}/view?{urllib.parse.urlencode(file)}"
            # The frontend's own reader of a dropped MP4, on the file as a drop would hand it over.
            tags = await page.eval(f"""fetch({json.dumps(view_url)}).then(r => r.blob()).then(b =>
                window.comfyAPI.isobmff.getFromIsobmffFile(new File([b], {json.dumps(file["filename"])})))""")
            scripts = await page.eval("performance.getEntriesByType('resource').map(e => e.name)"
                                      ".filter(n => n.endsWith('/liveavatar.js'))")
    return {"running": running, "done": done, "tags": tags, "console": page.console, "scripts": scripts}


def test_writer_node_shows_live_stats_and_player(server, object_info, browser):
    pytest.importorskip("aiohttp")
    # A first visit opens the template browser over the canvas; this user has seen it.
    assert _post(f"{server.url}/settings/Comfy.TutorialCompleted", True)[0] == 200
    graph = _served_graph(server.url, UI_FILES[0])
    prompt = _small(ui_to_api(graph, object_info), num_clips=2)
    prompt[_writer_id(prompt)]["inputs"]["filename_prefix"] = "video/LiveAvatar_browser"
    seen = asyncio.run(asyncio.wait_for(_drive(browser, server.url, graph, prompt), RUN_S + 2 * START_S))
    running, done = seen["running"], seen["done"]
    line = r"block \d+/\d+ · [\d.]+ fps · first frame [\d.]+ s · ETA \d+ s"
    assert re.fullmatch(line + ".*", running["stats"]), running["stats"]
    assert "LiveAvatar_browser" in running["live"]["src"] and "frames so far" in running["caption"]
    assert running["live"]["width"] > 0 and running["live"]["height"] > 0 and running["fits"]
    file = done["outputs"]["images"][0]
    assert done["outputs"]["animated"] == [True] and file["filename"] in done["finished"]["src"]
    # The live player gives way to ComfyUI's own; the final stats stay; the health plot below.
    assert done["live"] is None and done["fits"]
    # The tiny model's noise is far off the picture's colours: the health alarm is on the line too
    # (from the second block on: the checks run one block behind).
    assert re.fullmatch(line + " · health: colour_frame.*", done["stats"]), done["stats"]
    plot = done["outputs"]["liveavatar_health"][0]
    assert plot["filename"] == file["filename"].removesuffix(".mp4") + ".health.png"
    assert urllib.parse.quote(plot["filename"]) in done["health"]["src"] or plot["filename"] in done["health"]["src"]
    # Served under one name only, the extension loads and registers once (the folder name is not the
    # project name here); newer frontends report the second registration only as a failed import.
    assert len(seen["scripts"]) == 1, seen["scripts"]
    assert not [line for line in seen["console"] if "already registered" in line], seen["console"]
    # What a drop of the file onto the canvas reads: the workflow and prompt the run was queued with.
    assert seen["tags"]["workflow"] == graph
    assert {nid: {k: node[k] for k in ("class_type", "inputs")} for nid, node in seen["tags"]["prompt"].items()} \
        == {nid: {k: node[k] for k in ("class_type", "inputs")} for nid, node in prompt.items()}


# Each node as the frontend laid it out after loading, and the size it says the node needs.
LAYOUT = """app.graph.nodes.map(n => ({id: Number(n.id), pos: Array.from(n.pos), size: Array.from(n.size),
  needs: Array.from(n.computeSize())}))"""


async def _layouts(devtools: str, url: str, graphs: dict[str, dict]) -> dict[str, list]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.put(f"{devtools}/json/new?{url}") as response:
            target = await response.json()
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1,
                            mobile=False)
            await page.until("window.app?.graph && window.app.extensions?.some(e => e.name === 'liveavatar.writer')",
                             START_S, "the UI with the Live Avatar extension")
            seen = {}
            for name, graph in graphs.items():
                await page.eval(f"app.loadGraphData({json.dumps(graph)})")
                await page.until(f"app.graph.nodes.length === {len(graph['nodes'])}", 30, name)
                await asyncio.sleep(1)  # DOM widgets (the prompt box, the note) settle their sizes
                await page.eval("app.canvas.draw(true, true)")
                seen[name] = await page.eval(LAYOUT)
                await page.screenshot(f"template_{name}")
    return seen


def test_templates_open_without_overlapping_nodes(server, browser):
    """As the frontend opens each template: no node needs more room than the file gives it, and no
    node covers another (the Loader once hid Text Encode and its own last widgets)."""
    pytest.importorskip("aiohttp")
    assert _post(f"{server.url}/settings/Comfy.TutorialCompleted", True)[0] == 200
    graphs = {p.stem: _served_graph(server.url, p) for p in UI_FILES}
    seen = asyncio.run(asyncio.wait_for(_layouts(browser, server.url, graphs), 4 * START_S))
    for name, nodes in seen.items():
        recorded = {n["id"]: n["size"] for n in graphs[name]["nodes"]}
        for node in nodes:
            assert all(need <= have + 1 for need, have in zip(node["needs"], recorded[node["id"]])), (name, node)
        assert overlaps(node_boxes({"nodes": nodes})) == [], (name, nodes)
