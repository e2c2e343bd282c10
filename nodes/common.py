"""Names shared by every node of the pack, and the schema every node declares."""
import inspect

from comfy_api.latest import io

NODE_ID_PREFIX = "CSA_"
CATEGORY = "content-style adapters"


def node_id(name: str) -> str:
    """Node ids carry the pack prefix and never change once published."""
    return NODE_ID_PREFIX + name


def schema(node: type, name: str, title: str, inputs: list, outputs: list, output_node: bool = False) -> io.Schema:
    """A node's V3 schema in the pack's category: published id CSA_<name>, the node class's docstring as its
    description (what the UI shows on hover)."""
    return io.Schema(node_id=node_id(name), display_name=title, category=CATEGORY,
                     description=" ".join((inspect.getdoc(node) or "").split()),
                     inputs=inputs, outputs=outputs, is_output_node=output_node)


def strength_input(name: str, tooltip: str, default: float = 1.0, limit: float = 10.0, step: float = 0.01):
    """A strength or λ multiplier: a float from -limit to limit (negative values subtract the adapter)."""
    return io.Float.Input(name, default=default, min=-limit, max=limit, step=step, tooltip=tooltip)
