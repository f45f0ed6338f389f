"""Resident model serving inside the VM (issue 14). Not wired into the agent yet: engine.py is the batching core."""
