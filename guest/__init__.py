"""The in-guest side of hvctl: the agent and its workloads. Imports nothing from hvctl except shared RPC schemas."""
