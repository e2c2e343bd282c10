"""The pack in ComfyUI's real web front end (comfyui_frontend_package 1.32.9), driven by Playwright in headless Chromium.

What a user does, checked the way a user would see it fail:

- the node library shows the pack's category with every node the pack registers;
- every workflow in workflows/ opens from the template browser (Templates > Extensions > content_style_adapters; the
  server serves a pack's ``workflows/`` folder as its templates) without a missing-node dialog, with every widget
  holding the value the file gives it (nothing shifted, replaced or out of range) and no warning in the console;
- the front end turns each UI workflow into exactly its API twin in workflows/api/ (one source for both formats);
- pressing Run completes, and the saved images show up in the graph;
- a screenshot of each workflow after its run is saved (to docs/screenshots/, which the README shows, with
  CSA_WRITE_SCREENSHOTS=1: `make screenshots`; else to a scratch folder).

Needs Debian's chromium and the playwright package; scripts/setup_host.sh installs both (``make test`` runs it).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pytest

import comfy_host

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))
# The README's pictures and the template cards are rewritten only when asked (make screenshots), so that a test run
# leaves the checkout as it found it; otherwise they go to a scratch folder and are still taken and checked.
WRITE_TO_REPO = os.environ.get("CSA_WRITE_SCREENSHOTS") == "1"
SCRATCH = Path(tempfile.gettempdir()) / "csa-browser-screenshots"
SCREENSHOTS = REPO_ROOT / "docs" / "screenshots" if WRITE_TO_REPO else SCRATCH
THUMBNAILS = REPO_ROOT / "workflows" if WRITE_TO_REPO else SCRATCH
CATEGORY = "content-style adapters"
CHROMIUM = Path("/usr/bin/chromium")
# Offline, headless and quiet: no sandbox (root), no GPU, no calls home at start-up.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
RUN_TIMEOUT_MS = 240_000

THUMBNAIL_SIZE = (480, 300)
# Console lines that say nothing about a workflow: files a fresh user does not have yet (404s of user data), the front
# end's calls to the outside, which this closed network refuses, and template thumbnails (test_every_workflow_has_a_
# thumbnail checks those on their own, so a new workflow's first run can make its thumbnail).
BENIGN_CONSOLE = ("Failed to load resource", "violates the following Content Security Policy", "api.comfy.org",
                  f"Failed to cache media: /api/workflow_templates/{comfy_host.PACK_FOLDER_NAME}/")


def pack_nodes(object_info: dict) -> dict[str, dict]:
    return {name: info for name, info in object_info.items()
            if info.get("python_module") == f"custom_nodes.{comfy_host.PACK_FOLDER_NAME}"}


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get_json("/object_info")


@pytest.fixture(scope="module")
def page(comfy_server, tmp_path_factory):
    """One browser page on the server's front end for the whole module, with a fresh profile."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing; run scripts/setup_host.sh (make test does)")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing; run scripts/setup_host.sh (make test does), it installs Debian's chromium")
    # Server-side user settings: no minimap on the screenshots; the template browser opens when a test clicks it, not
    # by itself at a first visit (at a moment a test would have to guess).
    comfy_server.post_json("/settings/Comfy.Minimap.Visible", False)
    comfy_server.post_json("/settings/Comfy.TutorialCompleted", True)
    # draw node text at every zoom: a fitted view of a large workflow is below the default level-of-detail threshold
    comfy_server.post_json("/settings/LiteGraph.Canvas.MinFontSizeForLOD", 0)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport=VIEWPORT, device_scale_factor=2)  # sharp text on the screenshots
        # the "Nodes 2.0" banner would cover the top of every screenshot
        context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        page = context.pages[0] if context.pages else context.new_page()
        page.console_lines = []
        page.on("console", lambda message: page.console_lines.append((message.type, message.text)))
        page.goto(comfy_server.url)
        page.wait_for_function("window.app && app.graph && app.canvas && app.vueAppReady", timeout=120_000)
        page.evaluate("""() => { window.__csaEvents = [];
            for (const kind of ['execution_success', 'execution_error', 'execution_interrupted'])
                app.api.addEventListener(kind, event => window.__csaEvents.push([kind, event.detail])); }""")
        try:
            yield page
        finally:
            context.close()


def close_dialogs(page) -> None:
    for _ in range(3):
        if not page.locator("[role=dialog]").count():
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)


def visible_dialog_texts(page) -> list[str]:
    return [text.strip() for text in page.locator("[role=dialog]").all_inner_texts()]


def open_template(page, name: str, workflow: dict) -> None:
    """Templates (side bar) > Extensions > content_style_adapters > the workflow's card, as a user clicks it."""
    close_dialogs(page)
    page.locator(".templates-tab-button").click()
    page.get_by_text(comfy_host.PACK_FOLDER_NAME, exact=True).click()
    page.locator(f"[data-testid='template-workflow-{name}']").click()
    expected = json.dumps(sorted([node["id"], node["type"]] for node in workflow["nodes"]), separators=(",", ":"))
    page.wait_for_function("expected => JSON.stringify(app.graph.nodes.map(n => [n.id, n.type])"
                           ".sort((a, b) => a[0] - b[0])) === expected", arg=expected, timeout=30_000)
    page.wait_for_timeout(300)  # dialogs the loader raises (missing nodes, models) open right after configure


def graph_state(page) -> list[dict]:
    """Every node as the front end holds it: type, whether its type is registered, its widgets."""
    return page.evaluate("""() => app.graph.nodes.map(node => ({
        id: node.id, type: node.type, registered: node.type in LiteGraph.registered_node_types,
        widgets: (node.widgets || []).filter(w => w.serialize !== false).map(w => ({
            name: w.name, type: w.type, value: w.value,
            options: Array.isArray(w.options?.values) ? w.options.values : null,
            min: w.options?.min ?? null, max: w.options?.max ?? null})),
    }))""")


def load_problems(page, workflow: dict, console_from: int) -> list[str]:
    """What a user would see wrong right after opening the workflow: an empty list when it opened cleanly."""
    problems = [f"a dialog is open after loading: {text[:300]!r}" for text in visible_dialog_texts(page)]
    state = {node["id"]: node for node in graph_state(page)}
    for saved in workflow["nodes"]:
        node = state.get(saved["id"])
        if node is None:
            problems.append(f"node {saved['id']} ({saved['type']}) is not in the loaded graph")
            continue
        if not node["registered"]:
            problems.append(f"node {saved['id']}: type {saved['type']} is missing from the front end")
            continue
        values = [w["value"] for w in node["widgets"]]
        if values != saved.get("widgets_values", []):
            problems.append(f"node {saved['id']} ({saved['type']}): widgets hold {values}, "
                            f"the file gives {saved.get('widgets_values', [])}")
        for widget in node["widgets"]:
            if widget["options"] is not None and widget["value"] not in widget["options"]:
                problems.append(f"node {saved['id']} ({saved['type']}).{widget['name']}: {widget['value']!r} is not "
                                f"one of its choices {widget['options'][:8]}")
            if isinstance(widget["value"], (int, float)) and not isinstance(widget["value"], bool):
                low, high = widget["min"], widget["max"]
                if (low is not None and widget["value"] < low) or (high is not None and widget["value"] > high):
                    problems.append(f"node {saved['id']} ({saved['type']}).{widget['name']}: {widget['value']} "
                                    f"outside [{low}, {high}]")
    problems += [f"console {kind}: {text[:300]}" for kind, text in page.console_lines[console_from:]
                 if kind in ("warning", "error") and not any(b in text for b in BENIGN_CONSOLE)]
    return problems


def front_end_prompt(page, object_info: dict) -> dict:
    """The API-format graph the front end sends for the loaded workflow (its own graphToPrompt), as the server reads
    it: inputs the node declares. (The front end also sends the text of display-only widgets, such as Preview Any's
    'preview' box, and a '_meta' title; the server ignores both.)"""
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    declared = {name: {input_name for section in info["input"].values() for input_name in section}
                for name, info in object_info.items()}
    return {node_id: {"class_type": node["class_type"],
                      "inputs": {k: v for k, v in node["inputs"].items() if k in declared[node["class_type"]]}}
            for node_id, node in prompt.items()}


def run_from_ui(page, timeout_ms: int = RUN_TIMEOUT_MS) -> list:
    """Press Run and wait for the server to report the prompt's end; returns [kind, detail] of that end."""
    page.evaluate("() => { window.__csaEvents = []; }")
    page.get_by_role("button", name="Run", exact=True).click()
    deadline = time.monotonic() + timeout_ms / 1000
    while time.monotonic() < deadline:
        events = page.evaluate("() => window.__csaEvents")
        if events:
            return events[0]
        dialogs = [t for t in visible_dialog_texts(page) if t]
        if dialogs:  # a prompt the server refuses never starts: the front end shows why in a dialog
            return ["refused", dialogs]
        page.wait_for_timeout(250)
    raise TimeoutError(f"the run did not end within {timeout_ms / 1000:.0f} s")


def shown_images(page) -> dict[int, list[dict]]:
    """Images the front end shows on nodes after a run, by node id, with whether the browser decoded them."""
    return {int(k): v for k, v in page.evaluate("""() => Object.fromEntries(app.graph.nodes
        .filter(node => node.imgs && node.imgs.length)
        .map(node => [node.id, node.imgs.map(img => ({src: img.src, loaded: img.complete && img.naturalWidth > 0}))]))
    """).items()}


def save_screenshot(page, name: str) -> Path:
    """<name>.png (docs/screenshots/: the README's pictures) and <name>.jpg (workflows/: its card in the template
    browser, which asks the pack for <name>.jpg next to <name>.json); into the repository only with
    CSA_WRITE_SCREENSHOTS=1."""
    from PIL import Image

    page.evaluate("() => { app.canvas.deselectAll?.(); }")
    page.keyboard.press(".")  # Fit View
    page.wait_for_timeout(400)
    # the graph's box on screen (canvas coordinates through the view's offset and scale), with a margin
    box = page.evaluate("""() => {
        const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
        const bounds = app.graph.nodes.map(n => n.getBounding());
        const left = Math.min(...bounds.map(b => b[0])), top = Math.min(...bounds.map(b => b[1]));
        const right = Math.max(...bounds.map(b => b[0] + b[2])), bottom = Math.max(...bounds.map(b => b[1] + b[3]));
        const x = rect.left + (left + ds.offset[0]) * ds.scale, y = rect.top + (top + ds.offset[1]) * ds.scale;
        return {x: x, y: y, width: (right - left) * ds.scale, height: (bottom - top) * ds.scale}; }""")
    margin = 24
    clip = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin)}
    clip["width"] = min(VIEWPORT["width"] - clip["x"], box["width"] + 2 * margin)
    clip["height"] = min(VIEWPORT["height"] - clip["y"], box["height"] + 2 * margin)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), clip=clip)
    with Image.open(path) as picture:
        thumbnail = picture.convert("RGB")
        thumbnail.thumbnail(THUMBNAIL_SIZE)
        THUMBNAILS.mkdir(parents=True, exist_ok=True)
        thumbnail.save(THUMBNAILS / f"{name}.jpg", quality=85)
    return path


# ---------------------------------------------------------------------------------------------------------------------

def test_node_library_lists_every_pack_node(page, object_info):
    close_dialogs(page)
    page.locator(".node-library-tab-button").click()
    folder = page.locator("[role=treeitem]").filter(has=page.get_by_text(CATEGORY, exact=True)).first
    folder.wait_for()
    if folder.get_attribute("aria-expanded") != "true":
        folder.locator(".node-content").first.click()
    leaves = folder.locator("[role=group] [role=treeitem]")
    leaves.first.wait_for()
    shown = sorted(label.strip() for label in leaves.evaluate_all("items => items.map(i => i.getAttribute('aria-label'))"))
    expected = sorted(info["display_name"] for info in pack_nodes(object_info).values())
    assert len(expected) >= 20, f"the server lists only {len(expected)} pack nodes"
    assert {info["category"] for info in pack_nodes(object_info).values()} == {CATEGORY}
    assert shown == expected, f"node library shows {shown}, the pack registers {expected}"
    page.locator(".node-library-tab-button").click()  # close the side panel again


def test_template_browser_lists_every_workflow(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get(comfy_host.PACK_FOLDER_NAME, [])) == sorted(p.stem for p in WORKFLOWS)


# Every workflow is opened and read back by default; a run from the UI (the front end showing the images) is the
# same path for each, so the default suite runs the quickest and make test-full (or make screenshots) runs all of
# them. The server suite runs every workflow's API twin by default (tests/e2e/test_server.py).
RUN_BY_DEFAULT = "apply_adapter"
RUNS = [pytest.param(p, id=p.stem, marks=() if p.stem == RUN_BY_DEFAULT or WRITE_TO_REPO else pytest.mark.full)
        for p in WORKFLOWS]


def open_and_check(page, object_info, workflow_path) -> dict:
    """Open the workflow from the template browser: no load problem, and the front end sends exactly its API twin."""
    workflow = json.loads(workflow_path.read_text())
    console_from = len(page.console_lines)
    open_template(page, workflow_path.stem, workflow)
    assert load_problems(page, workflow, console_from) == []
    twin = json.loads((workflow_path.parent / "api" / workflow_path.name).read_text())
    assert front_end_prompt(page, object_info) == twin, (f"the front end makes a different API graph of {workflow_path.name} than "
                                            f"workflows/api/{workflow_path.name}; run `make workflows`")
    return workflow


@pytest.mark.parametrize("workflow_path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_workflow_opens_and_sends_its_api_twin(page, object_info, workflow_path):
    open_and_check(page, object_info, workflow_path)


@pytest.mark.parametrize("workflow_path", RUNS)
def test_workflow_runs_from_the_ui_and_shows_images(page, object_info, workflow_path):
    workflow = open_and_check(page, object_info, workflow_path)
    end = run_from_ui(page)
    assert end[0] == "execution_success", f"the run from the UI ended with {end}"
    image_nodes = {node["id"] for node in workflow["nodes"] if node["type"] in ("SaveImage", "PreviewImage")}
    page.wait_for_function("ids => ids.every(id => { const n = app.graph.getNodeById(id); return n.imgs && "
                           "n.imgs.length && n.imgs.every(i => i.complete && i.naturalWidth > 0) })",
                           arg=sorted(image_nodes), timeout=30_000)
    shown = shown_images(page)
    assert image_nodes and image_nodes <= set(shown), f"image nodes {sorted(image_nodes)}, showing: {sorted(shown)}"
    assert all(image["loaded"] for node_id in image_nodes for image in shown[node_id])
    save_screenshot(page, workflow_path.stem)


def test_every_workflow_has_a_thumbnail():
    missing = [p.with_suffix(".jpg").name for p in WORKFLOWS if not p.with_suffix(".jpg").is_file()]
    assert missing == [], f"no template thumbnail {missing}: run `make screenshots`, it writes them"


def test_a_renamed_node_is_caught(page, tmp_path):
    """A node id changed in the pack but not in a workflow: the same checks report the missing type."""
    workflow = json.loads((REPO_ROOT / "workflows" / "qr_merge.json").read_text())
    renamed = next(node for node in workflow["nodes"] if node["type"].startswith("CSA_"))
    renamed["type"] = renamed["type"] + "Renamed"
    console_from = len(page.console_lines)
    page.evaluate("graph => app.loadGraphData(graph, true, true, 'renamed')", workflow)
    page.wait_for_timeout(500)
    problems = load_problems(page, workflow, console_from)
    close_dialogs(page)
    assert any("missing" in problem.lower() and renamed["type"] in problem for problem in problems), problems
