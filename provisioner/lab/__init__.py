"""The simulated lab rack: fake BMC endpoints, machine containers and their helpers."""
