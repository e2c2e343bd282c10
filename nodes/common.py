"""Names shared by every node of the pack."""
NODE_ID_PREFIX = "CSA_"
CATEGORY = "content-style adapters"


def node_id(name: str) -> str:
    """Node ids carry the pack prefix and never change once published."""
    return NODE_ID_PREFIX + name
