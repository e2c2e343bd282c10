"""Names shared by every node of the pack, and the schema every node declares."""
import inspect

from comfy_api.latest import io

NODE_ID_PREFIX = "CSA_"
CATEGORY = "content-style adapters"


def node_id(name: str) -> str:
    """Node ids carry the pack prefix and never change once published."""
    return NODE_ID_PREFIX + name


def check_widget_values(node_schema: io.Schema, values: dict) -> bool | str:
    """ComfyUI 0.3.75 checks ranges and types only of V1 widgets and combo values not at all for V3 nodes; every pack
    node checks its own (numbers within min / max, numbers that are numbers, combo values it offers). Returns True
    or a message naming each bad input, in the words of ComfyUI's own validation."""
    problems = []
    for spec in node_schema.inputs:
        value = values.get(spec.id)
        if value is None or isinstance(value, (list, tuple, dict)):  # not given, or a link (checked by type)
            continue
        if isinstance(spec, (io.Int.Input, io.Float.Input)):
            kind = "INT" if isinstance(spec, io.Int.Input) else "FLOAT"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or kind == "INT" and value != int(value):
                problems.append(f"{spec.id}: Failed to convert an input value to a {kind} value ({value!r})")
                continue
            if spec.min is not None and value < spec.min:
                problems.append(f"{spec.id}: Value {value} smaller than min of {spec.min}")
            if spec.max is not None and value > spec.max:
                problems.append(f"{spec.id}: Value {value} bigger than max of {spec.max}")
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            problems.append(f"{spec.id}: {value!r} not in list (the choices are {list(spec.options)[:12]})")
    return True if not problems else "; ".join(problems)


class PackNode(io.ComfyNode):
    """Every node of the pack: its widget values are checked against its schema before it runs."""

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        return check_widget_values(cls.define_schema(), values)


def schema(node: type, name: str, title: str, inputs: list, outputs: list, output_node: bool = False) -> io.Schema:
    """A node's V3 schema in the pack's category: published id CSA_<name>, the node class's docstring as its
    description (what the UI shows on hover)."""
    return io.Schema(node_id=node_id(name), display_name=title, category=CATEGORY,
                     description=" ".join((inspect.getdoc(node) or "").split()),
                     inputs=inputs, outputs=outputs, is_output_node=output_node)


def strength_input(name: str, tooltip: str, default: float = 1.0, limit: float = 10.0, step: float = 0.01):
    """A strength or λ multiplier: a float from -limit to limit (negative values subtract the adapter)."""
    return io.Float.Input(name, default=default, min=-limit, max=limit, step=step, tooltip=tooltip)


def cfg_conditioning_inputs(positive: str, negative: str) -> list:
    """The positive and negative CONDITIONING inputs of a node that samples with CFG."""
    return [io.Conditioning.Input("positive", tooltip=positive), io.Conditioning.Input("negative", tooltip=negative)]
