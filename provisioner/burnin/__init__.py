"""Burn-in: the agent run on each node, floors per SKU, the controller's verdicts and reports."""
