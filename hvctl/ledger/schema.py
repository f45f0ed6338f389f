"""The ledger's schema, as the migrations that build it: each entry moves it one version forward."""

from __future__ import annotations

# Each entry moves the schema one version forward. Never edit a released entry; append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        uri TEXT NOT NULL,
        accel TEXT,
        accel_probed_at REAL,
        cpus INTEGER,
        memory_mib INTEGER,
        enabled INTEGER NOT NULL DEFAULT 1,
        added_at REAL NOT NULL
    );
    CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        host TEXT NOT NULL REFERENCES hosts(name),
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        image TEXT NOT NULL,
        base_disk TEXT NOT NULL,
        overlay TEXT NOT NULL UNIQUE,
        console_log TEXT NOT NULL,
        agent_socket TEXT NOT NULL,
        ssh_port INTEGER NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        UNIQUE (host, ssh_port)
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        vm TEXT,
        host TEXT,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT
    );
    CREATE INDEX events_vm ON events (vm, id);
    """,
    """
    ALTER TABLE vms ADD COLUMN agent_token TEXT;
    ALTER TABLE vms ADD COLUMN host_pubkey TEXT;
    ALTER TABLE vms ADD COLUMN seed TEXT;
    CREATE TABLE tenant_keys (
        tenant TEXT NOT NULL,
        pubkey TEXT NOT NULL,
        added_at REAL NOT NULL,
        PRIMARY KEY (tenant, pubkey)
    );
    """,
    """
    ALTER TABLE hosts ADD COLUMN numa TEXT;
    ALTER TABLE hosts ADD COLUMN gpus TEXT;
    CREATE TABLE reservations (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        host TEXT NOT NULL REFERENCES hosts(name),
        tenant TEXT NOT NULL,
        vm TEXT,
        kind TEXT NOT NULL,
        usage TEXT NOT NULL,
        counts_against_tenant INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE gpu_bindings (
        host TEXT NOT NULL REFERENCES hosts(name),
        address TEXT NOT NULL,
        vm TEXT,
        original_driver TEXT,
        step TEXT NOT NULL,
        state TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (host, address)
    );
    """,
    """
    ALTER TABLE hosts ADD COLUMN disk_gib INTEGER;
    """,
    # 0 once a boot on the host found that its libvirtd cannot set memory hard limits; NULL: not known otherwise.
    """
    ALTER TABLE hosts ADD COLUMN memory_limits INTEGER;
    """,
    # Durable intents: one row per VM while an operation on it is in flight. The row is the VM's operation lock
    # and the record reconcile reads after a crash: the step reached and what exists so far (``data``).
    """
    ALTER TABLE vms ADD COLUMN domain_uuid TEXT;
    CREATE TABLE operations (
        vm TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        source TEXT,
        target TEXT,
        step TEXT NOT NULL,
        data TEXT NOT NULL,
        holder TEXT NOT NULL,
        started_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    # A VM's snapshots (libvirt's internal qcow2 snapshots): what each charges against its tenant's disk quota and
    # its host's disk, and whether it is known to exist ('creating' until libvirt has made it, 'deleting' until it
    # has removed it: an interrupted snapshot operation is settled by asking libvirt).
    """
    CREATE TABLE snapshots (
        vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        host TEXT NOT NULL,
        memory INTEGER NOT NULL,
        disk_gib REAL NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (vm, name)
    );
    """,
    # Devices found dead after a release (config space reads 0xffff): not placed again until they answer.
    """
    CREATE TABLE gpu_health (
        host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        address TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL,
        since REAL NOT NULL,
        PRIMARY KEY (host, address)
    );
    """,
    # Tenant networks (hvctl network): an isolated L2 segment per network, its subnet, the bridge it gets on each host
    # that has one of its VMs and the VXLAN id that joins those hosts; the IPAM, one address per VM, gone with the
    # VM's row; and each host's underlay address, which VXLAN runs over.
    """
    CREATE TABLE networks (
        name TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        subnet TEXT NOT NULL,
        bridge TEXT NOT NULL UNIQUE,
        vni INTEGER NOT NULL UNIQUE,
        created_at REAL NOT NULL
    );
    CREATE TABLE underlays (
        host TEXT PRIMARY KEY REFERENCES hosts(name) ON DELETE CASCADE,
        address TEXT NOT NULL
    );
    CREATE TABLE network_addresses (
        network TEXT NOT NULL REFERENCES networks(name),
        vm TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE,
        address TEXT NOT NULL,
        PRIMARY KEY (network, address),
        UNIQUE (network, vm)
    );
    """,
    # The SSH forward port a migration's reservation holds on its target: chosen in the reservation's transaction, so
    # that two migrations to one host at once (from one controller or two) never choose the same port.
    """
    ALTER TABLE reservations ADD COLUMN ssh_port INTEGER;
    """,
    # Who is uploading which image to which host's pool right now: one command at a time (two creates onto a new
    # host would each delete what the other was writing). A row is a lease held like an operation lock: its holder
    # is checked for life exactly on its own machine, and trusted from elsewhere while it keeps updating the row.
    """
    CREATE TABLE image_uploads (
        host TEXT NOT NULL,
        image TEXT NOT NULL,
        holder TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (host, image)
    );
    """,
]
