"""Drivers that run external automation: Ansible through ansible-runner (``runner.ansible``).

Import the driver module itself (``from provisioner.runner.ansible import run_playbook``):
ansible-runner is imported only when a playbook runs, so the CLI starts fast.
"""
