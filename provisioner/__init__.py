"""provisioner: a declarative fleet spec turned into running, validated bare-metal GPU nodes."""

__version__ = "0.1.0"
