"""Convert between ComfyUI's two workflow formats, using a server's /object_info as the schema.

- UI format (workflows/*.json): what users open in ComfyUI: nodes with positions, links, widget values.
- API format (workflows/api/*.json): what POST /prompt takes: {id: {class_type, inputs}}.

``api_to_ui`` generates the UI file from its API twin; ``ui_to_api`` reads it back, and the test suite
checks that the round trip gives the twin exactly. The browser suite (tests/e2e/test_browser.py) checks the part that
matters to users: ComfyUI's own front end opens each UI file and sends exactly its API twin. For that the twin lists
every widget input (``--write`` fills in defaults the twin left out) and the UI file carries the front end's extra
"control after generate" value after every seed. Regenerate the UI files after editing a twin:

    .venv/bin/python scripts/workflow_formats.py --write
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from comfy_host import REPO_ROOT, ComfyServer

WORKFLOWS_DIR = REPO_ROOT / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# layout of generated UI files: columns by depth, nodes stacked in a column at their estimated height (the front end
# grows a node that is too small for its widgets, but then it overlaps the next one)
NODE_WIDTH, COLUMN_GAP, ROW_GAP, MAX_STACK = 340, 50, 40, 720
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, TEXT_BOX_HEIGHT, PREVIEW_HEIGHT = 30, 22, 24, 110, 200
SEED_NAMES = ("seed", "noise_seed")  # INT inputs that the front end gives a control widget unless told otherwise


def input_specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every input of a node, required first, in schema order."""
    return [(name, spec) for section in ("required", "optional")
            for name, spec in info["input"].get(section, {}).items()]


def is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def has_control_widget(name: str, spec: list) -> bool:
    """Seed-like inputs get an extra 'control after generate' widget value in the UI format: INT inputs that ask for
    it, and (front end 1.32's rule) INT inputs named seed or noise_seed that do not say otherwise."""
    options = spec[1] if len(spec) > 1 else {}
    if spec[0] != "INT":
        return False
    flag = options.get("control_after_generate")
    return bool(flag) if flag is not None else name in SEED_NAMES


def default_value(spec: list):
    options = spec[1] if len(spec) > 1 else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options", [])
    return choices[0] if choices else None


def complete_widgets(graph: dict, object_info: dict) -> dict:
    """The graph with every widget input present (defaults where the twin left one out), in schema order: what the
    front end sends for the UI file."""
    completed = {}
    for node_id, node in graph.items():
        inputs = dict(node["inputs"])
        for name, spec in input_specs(object_info[node["class_type"]]):
            if is_widget(spec) and name not in inputs:
                inputs[name] = default_value(spec)
        completed[node_id] = {"class_type": node["class_type"], "inputs": inputs}
    return completed


def estimated_height(info: dict, node: dict) -> int:
    """Roughly the height the front end draws a node at (slots, widgets, text boxes, image or text previews)."""
    specs = input_specs(info)
    slots = sum(1 for _, spec in specs if not is_widget(spec))
    widgets = [(name, spec) for name, spec in specs if is_widget(spec) and name in node["inputs"]
               and not isinstance(node["inputs"][name], list)]
    height = SLOT_HEIGHT * max(slots, len(info["output"])) + 8  # the title bar is drawn above the node's box
    for name, spec in widgets:
        multiline = len(spec) > 1 and spec[1].get("multiline")
        height += TEXT_BOX_HEIGHT if multiline else WIDGET_HEIGHT * (2 if has_control_widget(name, spec) else 1)
    if info.get("output_node"):
        height += PREVIEW_HEIGHT
    return height


def column_of(graph: dict) -> dict[str, int]:
    """Left-to-right layout: a node sits one column right of its deepest input."""
    columns: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in columns:
            sources = [v[0] for v in graph[node_id]["inputs"].values() if isinstance(v, list)]
            columns[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return columns[node_id]

    for node_id in graph:
        visit(node_id)
    return columns


def layout(graph: dict, object_info: dict) -> dict[str, tuple[int, int, int]]:
    """(x, y, height) of every node: columns left to right by depth, each node's column split into stacks no taller
    than MAX_STACK so a wide fan-in (ten loaders) does not make a tall thin picture."""
    columns = column_of(graph)
    stacks: dict[int, list[list[tuple[str, int]]]] = {}
    for node_id in sorted(graph, key=lambda n: (columns[n], int(n))):
        height = estimated_height(object_info[graph[node_id]["class_type"]], graph[node_id])
        column = stacks.setdefault(columns[node_id], [[]])
        if column[-1] and sum(h + TITLE_HEIGHT + ROW_GAP for _, h in column[-1]) + height > MAX_STACK:
            column.append([])
        column[-1].append((node_id, height))
    placed, x = {}, 40
    for column in (stacks[c] for c in sorted(stacks)):
        for stack in column:
            y = 40 + TITLE_HEIGHT
            for node_id, height in stack:
                placed[node_id] = (x, y, height)
                y += height + TITLE_HEIGHT + ROW_GAP
            x += NODE_WIDTH + COLUMN_GAP
    return placed


def api_to_ui(graph: dict, object_info: dict) -> dict:
    columns = column_of(graph)
    placed = layout(graph, object_info)
    nodes, links = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for order, node_id in enumerate(sorted(graph, key=lambda n: (columns[n], int(n)))):
        node = graph[node_id]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in input_specs(info):
            value = node["inputs"].get(name)
            if is_widget(spec):
                if name in node["inputs"]:
                    widgets.append(value)
                    if has_control_widget(name, spec):
                        widgets.append("fixed")
                continue
            link_id = None
            if isinstance(value, list):
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), int(value[1]), int(node_id), len(inputs), spec[0]])
                outputs_links.setdefault((value[0], int(value[1])), []).append(link_id)
            inputs.append({"name": name, "type": spec[0], "link": link_id})
        x, y, height = placed[node_id]
        nodes.append({
            "id": int(node_id), "type": node["class_type"],
            "pos": [x, y], "size": [NODE_WIDTH, height],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": kind, "slot_index": slot}
                        for slot, (name, kind) in enumerate(zip(info["output_name"], info["output"]))],
            "properties": {"Node name for S&R": node["class_type"]},
            "widgets_values": widgets,
        })
    for ui_node in nodes:
        for output in ui_node["outputs"]:
            output["links"] = outputs_links.get((str(ui_node["id"]), output["slot_index"]), [])
    return {"last_node_id": max(int(n) for n in graph), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for ui_node in workflow["nodes"]:
        info = object_info[ui_node["type"]]
        inputs = {}
        for slot in ui_node["inputs"]:
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        values = iter(ui_node.get("widgets_values", []))
        for name, spec in input_specs(info):
            if is_widget(spec):
                try:
                    inputs[name] = next(values)
                except StopIteration:
                    break
                if has_control_widget(name, spec):
                    next(values, None)
        graph[str(ui_node["id"])] = {"class_type": ui_node["type"], "inputs": inputs}
    return graph


def format_api(graph: dict) -> str:
    """API workflows are written one node per line, so diffs stay readable."""
    lines = [f"  {json.dumps(node_id)}: {json.dumps(node)}" for node_id, node in graph.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def twins() -> list[tuple[Path, Path]]:
    """(UI workflow, API twin) pairs, by file name."""
    return [(WORKFLOWS_DIR / api.name, api) for api in sorted((WORKFLOWS_DIR / "api").glob("*.json"))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate every UI workflow from its API twin")
    parser.add_argument("--base", type=Path, default=REPO_ROOT / ".host" / "base")
    args = parser.parse_args()
    with ComfyServer(args.base) as server:
        object_info = server.get_json("/object_info")
    for ui_path, api_path in twins():
        graph = complete_widgets(json.loads(api_path.read_text()), object_info)
        ui = api_to_ui(graph, object_info)
        if args.write:
            api_path.write_text(format_api(graph))
            ui_path.write_text(json.dumps(ui, indent=2) + "\n")
            print(f"wrote {ui_path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
