"""The fleet spec: typed models, a YAML loader that keeps file:line, cross-checks, catalog."""

from provisioner.spec.fleet import Fleet, Node
from provisioner.spec.loader import load_fleet

__all__ = ["Fleet", "Node", "load_fleet"]
