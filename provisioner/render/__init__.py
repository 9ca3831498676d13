"""Render: a validated fleet -> the files Ansible, dnsmasq, iPXE, the installers and Terraform
read. Pure and deterministic: the same spec and key give byte-identical files."""

from provisioner.render.tree import RenderedTree, render_fleet
from provisioner.render.writer import WriteReport, write_tree

__all__ = ["RenderedTree", "WriteReport", "render_fleet", "write_tree"]
