"""hvctl metrics: the fleet as a Prometheus exposition (prometheus_client), gathered fresh at each scrape.

- per VM, from each host's bulk ``getAllDomainStats``: CPU time, vCPUs, memory (the balloon's current size and
  QEMU's resident set), disk and network bytes and requests;
- per tenant: what its VMs and snapshots use of each quota, and the quota;
- per host: whether it answers and is enabled, its capacity, what VMs hold and what in-flight operations reserve;
- GPUs: who owns each passthrough device;
- migrations: completed and failed totals by mode, and their durations and downtimes (from the ledger's log).

Names follow Prometheus conventions: ``hvctl_`` prefix, base units (seconds, bytes), ``_total`` for counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector

from hvctl.accounting import Usage
from hvctl.context import Context
from hvctl.errors import HvctlError

MIB = 2**20
GIB = 2**30
# Usage fields → (metric stem, factor to base units).
RESOURCES = {"vcpus": ("vcpus", 1), "memory_mib": ("memory_bytes", MIB), "disk_gib": ("disk_bytes", GIB),
             "gpus": ("gpus", 1), "vms": ("vms", 1)}


class FleetCollector(Collector):
    """Collects from a fresh Context on each scrape (``open_context``), so that a long-running `--listen` sees
    the ledger and the hosts as they are now, and a scrape never shares a libvirt connection with another."""

    def __init__(self, open_context: Callable[[], Context]) -> None:
        self.open_context = open_context

    def collect(self) -> Iterator[Metric]:
        ctx = self.open_context()
        try:
            yield from _collect(ctx)
        finally:
            ctx.close()


def _collect(ctx: Context) -> Iterator[Metric]:
    ledger = ctx.ledger
    vms = ledger.vms.all()
    hosts = ledger.hosts.all()
    yield from _vm_metrics(ctx, vms, [h.name for h in hosts])
    yield from _tenant_metrics(ctx, vms)
    yield from _host_metrics(ctx, hosts)
    yield from _gpu_metrics(ctx)
    yield from _migration_metrics(ctx)


def _vm_metrics(ctx: Context, vms: list[Any], hosts: list[str]) -> Iterator[Metric]:
    labels = ["vm", "tenant", "host"]
    up = GaugeMetricFamily("hvctl_host_up", "1 when hvctl could read the host's libvirt at this scrape.",
                           labels=["host"])
    state = GaugeMetricFamily("hvctl_vm_state", "1 for the VM's state in the ledger.", labels=[*labels, "state"])
    running = GaugeMetricFamily("hvctl_vm_running", "1 when libvirt reports the VM's domain running.", labels=labels)
    vcpus = GaugeMetricFamily("hvctl_vm_vcpus", "Virtual CPUs.", labels=labels)
    cpu = CounterMetricFamily("hvctl_vm_cpu_seconds", "CPU time the VM's QEMU process used.", labels=labels)
    mem = GaugeMetricFamily("hvctl_vm_memory_bytes", "Memory given to the guest (the balloon's current size).",
                            labels=labels)
    rss = GaugeMetricFamily("hvctl_vm_memory_rss_bytes", "Resident memory of the VM's QEMU process.", labels=labels)
    disk_labels = [*labels, "device"]
    rd = CounterMetricFamily("hvctl_vm_disk_read_bytes", "Bytes read from the disk.", labels=disk_labels)
    wr = CounterMetricFamily("hvctl_vm_disk_write_bytes", "Bytes written to the disk.", labels=disk_labels)
    rdq = CounterMetricFamily("hvctl_vm_disk_read_requests", "Read requests to the disk.", labels=disk_labels)
    wrq = CounterMetricFamily("hvctl_vm_disk_write_requests", "Write requests to the disk.", labels=disk_labels)
    net_labels = [*labels, "interface"]
    rx = CounterMetricFamily("hvctl_vm_network_receive_bytes", "Bytes the guest received.", labels=net_labels)
    tx = CounterMetricFamily("hvctl_vm_network_transmit_bytes", "Bytes the guest sent.", labels=net_labels)
    by_host: dict[str, dict[str, dict[str, Any]]] = {}
    for host in hosts:
        try:
            by_host[host] = ctx.host(host).domain_stats()
            up.add_metric([host], 1)
        except HvctlError:
            up.add_metric([host], 0)
    for record in vms:
        values = [record.name, record.tenant, record.host]
        state.add_metric([*values, record.state], 1)
        stats = by_host.get(record.host, {}).get(record.name)
        if stats is None:
            continue
        running.add_metric(values, 1 if stats.get("state.state") == 1 else 0)
        vcpus.add_metric(values, stats.get("vcpu.current", record.spec.vcpus))
        if "cpu.time" in stats:
            cpu.add_metric(values, stats["cpu.time"] / 1e9)
        if "balloon.current" in stats:
            mem.add_metric(values, stats["balloon.current"] * 1024)
        if "balloon.rss" in stats:
            rss.add_metric(values, stats["balloon.rss"] * 1024)
        for i in range(int(stats.get("block.count", 0))):
            device = [*values, str(stats.get(f"block.{i}.name", i))]
            for family, key in ((rd, "rd.bytes"), (wr, "wr.bytes"), (rdq, "rd.reqs"), (wrq, "wr.reqs")):
                if f"block.{i}.{key}" in stats:
                    family.add_metric(device, stats[f"block.{i}.{key}"])
        for i in range(int(stats.get("net.count", 0))):
            nic = [*values, str(stats.get(f"net.{i}.name", i))]
            for family, key in ((rx, "rx.bytes"), (tx, "tx.bytes")):
                if f"net.{i}.{key}" in stats:
                    family.add_metric(nic, stats[f"net.{i}.{key}"])
    yield from (up, state, running, vcpus, cpu, mem, rss, rd, wr, rdq, wrq, rx, tx)


def _tenant_metrics(ctx: Context, vms: list[Any]) -> Iterator[Metric]:
    tenants = sorted({r.tenant for r in vms} | set(ctx.policy.tenants))
    usage = {tenant: ctx.ledger.tenant_usage(tenant) for tenant in tenants}
    for field, (stem, factor) in RESOURCES.items():
        used = GaugeMetricFamily(f"hvctl_tenant_{stem}_used", f"What the tenant's VMs (and, for disk, snapshots) "
                                                              f"hold of its {stem} quota.", labels=["tenant"])
        limit = GaugeMetricFamily(f"hvctl_tenant_{stem}_quota", f"The tenant's {stem} quota (absent: none).",
                                  labels=["tenant"])
        for tenant in tenants:
            used.add_metric([tenant], getattr(usage[tenant], field) * factor)
            known = ctx.policy.tenants.get(tenant)
            cap = known.quota.model_dump().get(field) if known is not None else None
            if cap is not None:
                limit.add_metric([tenant], cap * factor)
        yield used
        yield limit


def _host_metrics(ctx: Context, hosts: list[Any]) -> Iterator[Metric]:
    enabled = GaugeMetricFamily("hvctl_host_enabled", "1 when the scheduler may place VMs on the host.",
                                labels=["host"])
    for h in hosts:
        enabled.add_metric([h.name], 1 if h.enabled else 0)
    yield enabled
    reserved_by_host: dict[str, Usage] = {}
    for row in ctx.ledger.reservations.all():
        reserved_by_host[row.host] = reserved_by_host.get(row.host, Usage()) + row.usage
    capacity = {"vcpus": lambda h: h.cpus, "memory_mib": lambda h: h.memory_mib, "disk_gib": lambda h: h.disk_gib}
    usage = {h.name: ctx.ledger.host_usage(h.name) for h in hosts}
    for field, (stem, factor) in RESOURCES.items():
        allocated = GaugeMetricFamily(f"hvctl_host_{stem}_allocated", f"{stem} held on the host by its VMs, "
                                      "snapshots and in-flight reservations.", labels=["host"])
        reserved = GaugeMetricFamily(f"hvctl_host_{stem}_reserved", f"{stem} held on the host by operations in "
                                     "flight (a migration's target).", labels=["host"])
        total = GaugeMetricFamily(f"hvctl_host_{stem}_capacity", f"The host's {stem} as libvirt reports it.",
                                  labels=["host"])
        for h in hosts:
            allocated.add_metric([h.name], getattr(usage[h.name], field) * factor)
            reserved.add_metric([h.name], getattr(reserved_by_host.get(h.name, Usage()), field) * factor)
            size = capacity[field](h) if field in capacity else None
            if size is not None:
                total.add_metric([h.name], size * factor)
        yield allocated
        yield reserved
        if field in capacity:
            yield total


def _gpu_metrics(ctx: Context) -> Iterator[Metric]:
    owned = GaugeMetricFamily("hvctl_gpu_assigned", "1 for each passthrough device bound for a VM, by owner.",
                              labels=["host", "address", "vm", "state"])
    for row in ctx.ledger.gpus.bindings():
        owned.add_metric([row.host, row.address, row.vm or "", row.state], 1)
    devices = GaugeMetricFamily("hvctl_host_gpus", "Passthrough-capable GPUs found on the host.", labels=["host"])
    for h in ctx.ledger.hosts.all():
        devices.add_metric([h.name], len(ctx.ledger.hosts.hardware(h.name).gpus))
    yield owned
    yield devices


def _migration_metrics(ctx: Context) -> Iterator[Metric]:
    done = CounterMetricFamily("hvctl_migrations", "Migrations by outcome and mode.", labels=["outcome", "mode"])
    counts: dict[tuple[str, str], int] = {}
    durations: dict[str, list[float]] = {}
    downtimes: list[float] = []
    for event in ctx.ledger.events.of_kind("migration.completed"):
        data = event.data or {}
        mode = str(data.get("mode", "live"))
        counts[("completed", mode)] = counts.get(("completed", mode), 0) + 1
        if data.get("total_s") is not None:
            durations.setdefault(mode, []).append(float(data["total_s"]))
        if data.get("downtime_ms") is not None:
            downtimes.append(float(data["downtime_ms"]) / 1000)
    for event in ctx.ledger.events.of_kind("migration.failed"):
        # Older failures were logged without their mode: checkpoint ones say so in their message.
        mode = str((event.data or {}).get("mode") or ("checkpoint" if "checkpoint" in event.message else "live"))
        counts[("failed", mode)] = counts.get(("failed", mode), 0) + 1
    for (outcome, mode), n in sorted(counts.items()):
        done.add_metric([outcome, mode], n)
    yield done
    duration = SummaryMetricFamily("hvctl_migration_duration_seconds", "Completed migrations' total time.",
                                   labels=["mode"])
    for mode, values in sorted(durations.items()):
        duration.add_metric([mode], count_value=len(values), sum_value=sum(values))
    yield duration
    downtime = SummaryMetricFamily("hvctl_migration_downtime_seconds", "Completed live migrations' downtime, as "
                                   "QEMU measured it.")
    downtime.add_metric([], count_value=len(downtimes), sum_value=sum(downtimes))
    yield downtime


def exposition(open_context: Callable[[], Context]) -> bytes:
    """The text exposition, once."""
    from prometheus_client import CollectorRegistry, generate_latest  # loaded by `hvctl metrics` only

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(open_context))
    return bytes(generate_latest(registry))


def serve(open_context: Callable[[], Context], address: str, port: int) -> Any:
    """Serve /metrics on ``address``:``port`` in a background thread; returns the server (``shutdown()`` stops)."""
    from prometheus_client import CollectorRegistry, start_http_server  # `hvctl metrics --serve` only

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(open_context))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
