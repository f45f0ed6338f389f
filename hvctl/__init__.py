"""hvctl: a hypervisor orchestration layer that drives real libvirt VMs for model workloads."""

__version__ = "0.1.0"
