"""`python -m provisioner` runs the same CLI as the `provisioner` console script."""

from provisioner.cli import main

main()
