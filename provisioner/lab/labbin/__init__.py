"""Scripts the lab's stand-in NVIDIA packages install on nodes (``nvidia-smi``, ``dcgmi``,
``nvidia-ctk``): stdlib-only Python, run by the node's python3, reading the simulated GPUs in
``/run/provisioner-lab/gpus.json``. LAB BUILDS - not NVIDIA software.

:mod:`provisioner.lab.debcontents` copies each file into a package and fills in its
``@NAME@`` placeholders (driver version, CUDA version ...); imported here they keep the
placeholders, and tests set the module constants themselves.
"""
