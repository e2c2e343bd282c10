"""The shape of the code that keeps it easy to extend: node files stand alone, tests call nodes by keyword."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NODES = REPO_ROOT / "nodes"
# what node files may import from nodes/: the seam, the binding, runtime adapters, training, CLIP features, the
# scorer, names and sockets, plots (matplotlib: loss curves, masks, score tables, the sweep grid)
SUPPORT_MODULES = {"comfy_compat", "model_binding", "runtime_adapters", "training", "clip_features", "scoring",
                   "common", "sockets", "plots"}


def node_classes(path: Path) -> list[ast.ClassDef]:
    """Classes that declare a node schema (define_schema)."""
    return [node for node in ast.parse(path.read_text()).body if isinstance(node, ast.ClassDef)
            and any(isinstance(item, ast.FunctionDef) and item.name == "define_schema" for item in node.body)]


def defines_nodes(path: Path) -> bool:
    return bool(node_classes(path))


def test_every_node_checks_its_widget_values():
    """ComfyUI 0.3.75 skips range and combo checks for V3 nodes; PackNode.validate_inputs does them."""
    for path in sorted(NODES.glob("*.py")):
        for node in node_classes(path):
            assert [ast.unparse(b) for b in node.bases] == ["PackNode"], \
                f"nodes/{path.name}: {node.name} must subclass common.PackNode"


def pack_imports(path: Path) -> set[str]:
    """Modules of nodes/ that a file imports ('from .x import ...' / 'from . import x')."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.update([node.module] if node.module else [alias.name for alias in node.names])
    return found


def test_node_files_import_only_support_modules():
    node_files = {p.stem for p in NODES.glob("*.py") if defines_nodes(p)}
    assert node_files, "no node files found"
    assert not node_files & SUPPORT_MODULES, f"support modules must not define nodes: {node_files & SUPPORT_MODULES}"
    for path in sorted(NODES.glob("*.py")):
        if path.stem == "__init__":
            continue
        wrong = pack_imports(path) - SUPPORT_MODULES
        assert not wrong, f"nodes/{path.name} imports {sorted(wrong)}; share code through a support module instead"


def test_only_the_seam_imports_comfy_modules_outside_node_classes():
    """ComfyUI modules are imported by the seam; node files only by name for what they subclass or differentiate."""
    allowed = {"comfy_compat.py": None, "consistency_guidance.py": {"comfy.samplers"},
               "clip_features.py": {"comfy.ldm.modules.attention", "comfy.ops"}}
    for path in sorted(NODES.glob("*.py")):
        imported = {node.names[0].name for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Import) and node.names[0].name.startswith(("comfy.", "folder_paths"))}
        if path.name in allowed and allowed[path.name] is None:
            continue
        extra = imported - (allowed.get(path.name) or set())
        assert not extra, f"nodes/{path.name} imports {sorted(extra)}: reach ComfyUI through nodes/comfy_compat.py"


POSITIONAL_EXECUTE = re.compile(r"\.execute\(\s*(?!\*\*)[A-Za-z_][\w\[\]\.]*\s*[,)]")


def test_tests_and_benches_call_nodes_with_keywords():
    """A node's inputs can be reordered without silently feeding tests the wrong values."""
    offenders = []
    for path in [*(REPO_ROOT / "tests").rglob("*.py"), *(REPO_ROOT / "bench").rglob("*.py")]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if POSITIONAL_EXECUTE.search(line) and "=" not in line.split(".execute(", 1)[1].split(",")[0]:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}")
    assert not offenders, "call nodes with keyword arguments:\n" + "\n".join(offenders)


SEAM = {"comfy_compat.py", "clip_features.py"}  # the modules that may read ComfyUI's private internals
# ComfyUI internals (attributes, option keys) the seam's docstring lists: nothing else in the pack names them
PRIVATE_ATTRIBUTES = {"cond_stage_model", "first_stage_model", "process_tokens", "model_config", "unet_config", "backup",
                      "wrappers", "diffusion_model", "flipped_img_txt", "patch_size", "inner_model_options"}
PRIVATE_KEYS = {"patches_replace", "optimized_attention_override", "latent_format", "block_type", "block_index",
                "model_sampling"}


def private_uses(path: Path) -> list[str]:
    """Where a file names a ComfyUI private internal: an attribute, an option key, or the BaseModel behind a MODEL
    (``model.model``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRIBUTES:
            found.append(f"{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Attribute) and node.attr == "model" and isinstance(node.value, ast.Name) \
                and node.value.id == "model":
            found.append(f"{node.lineno}: model.model")
        if isinstance(node, ast.Constant) and node.value in PRIVATE_KEYS:
            found.append(f"{node.lineno}: {node.value!r}")
    return found


def test_only_the_seam_reads_comfyui_private_internals():
    offenders = {path.name: private_uses(path) for path in sorted(NODES.glob("*.py")) if path.name not in SEAM}
    offenders = {name: uses for name, uses in offenders.items() if uses}
    assert not offenders, f"ComfyUI internals outside the seam (move them behind nodes/comfy_compat.py): {offenders}"
    seam = {name: private_uses(NODES / name) for name in SEAM}
    assert all(seam.values()), "the check could not fail: the seam itself names these internals"


def test_every_metadata_key_is_defined_once_and_documented():
    """core/metadata.py owns every 'csa.' key; docs/file-metadata.md lists each with its description."""
    import sys

    sys.path.insert(0, str(REPO_ROOT))
    from core.metadata import KEYS

    pattern = re.compile(r"[\"']csa\.")
    written = [f"{path.relative_to(REPO_ROOT)}:{n}" for path in [*(REPO_ROOT / "core").glob("*.py"), *NODES.glob("*.py")]
               if path.name != "metadata.py" for n, line in enumerate(path.read_text().splitlines(), 1)
               if pattern.search(line)]
    assert not written, f"'csa.' keys outside core/metadata.py: {written}"
    page = (REPO_ROOT / "docs" / "file-metadata.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| (.+) \|$", page, re.MULTILINE))
    assert rows == KEYS
