# hvctl: `make demo` sets up a fresh Debian 12 machine (as root) and runs the main job; `make test` runs the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PY := .venv/bin/python
HVCTL := .venv/bin/hvctl
STATE_DIR ?= /var/lib/hvctl
# The system libvirtd this Makefile starts when none answers keeps its pidfiles and config copies here.
DAEMON_DIR ?= /var/lib/hvctl-libvirtd
DEBS := qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients libvirt-dev \
        pkg-config debootstrap cpio busybox-static genisoimage e2fsprogs kmod util-linux python3-venv python3-dev gcc procps \
        openssh-server openssh-client ovmf ebtables dnsmasq-base libpq5 postgresql
# postgresql: the tests start a throwaway server of their own (tests/framework/pgserver.py) for the shared-ledger suite.
PYTEST_ARGS ?=
# The test framework's daemons and images, which the demo stands on too (tests/framework: not part of hvctl).
DEVHOST := PYTHONPATH=tests $(PY) -m framework.devhost
# The stock-style cloud image `make demo` imports (built from Debian packages by tests/framework/devhost/stockimage.py).
STOCK_IMAGE ?= /var/tmp/hvctl-stock-debian-v2.qcow2

.PHONY: all deps venv image daemons demo demo-key demo-remote demo-quotas demo-workloads demo-networks demo-cloud test test-unit test-vm lint bench stop-daemons

all: venv

deps: .stamp-deps
.stamp-deps:
	@if ! dpkg -s $(DEBS) >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(DEBS); \
	fi
	@# The image builder runs `apt-get download`, which needs current package lists.
	@if [ -z "$$(find /var/lib/apt/lists -name '*_Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then apt-get update -qq; fi
	@touch $@

venv: .venv/.stamp
.venv/.stamp: pyproject.toml | .stamp-deps
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	@# torch first and pinned: its CPU wheel is on local disk; an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ml]'
	@touch $@

image: venv
	$(HVCTL) --state-dir $(STATE_DIR) image build minimal

# Start the machine's libvirtd (qemu:///system) if none answers. If a probe kernel cannot boot under KVM, the daemon
# runs where it cannot see /dev/kvm; otherwise every create takes ~44 s of capability re-probing (ENVIRONMENT.md).
daemons: image
	@if virsh -q -c qemu:///system version >/dev/null 2>&1; then \
	  echo "libvirtd already answers at qemu:///system"; \
	else \
	  $(DEVHOST) start $(DAEMON_DIR) --system --hide-kvm auto \
	    --probe-image "$$(ls -d $(STATE_DIR)/images/minimal@* | tail -1)"; \
	fi

stop-daemons:
	$(DEVHOST) stop $(DAEMON_DIR) --system

DEMO_KEY := $(STATE_DIR)/demo/acme_ed25519
# The demo's second "host": a private libvirtd on this machine that the demo VM live-migrates to.
H2_DIR := $(DAEMON_DIR)-h2
# The demo's remote host: libvirtd and sshd in their own namespaces behind a veth (198.18.1.2), reached only as
# qemu+ssh with a pinned host key, and blind to this machine's state dir.
FAR_DIR := $(DAEMON_DIR)-far
TWO := $(HVCTL) --state-dir $(STATE_DIR) --policy policies/two-tenants.yaml
# Where the demo tenant's ssh -L brings the VM's model server.
DEMO_SERVE_PORT ?= 18080

demo: daemons
	$(HVCTL) --state-dir $(STATE_DIR) image build base
	@$(HVCTL) --state-dir $(STATE_DIR) destroy demo >/dev/null 2>&1 || true
	@$(HVCTL) --state-dir $(STATE_DIR) destroy far-demo >/dev/null 2>&1 || true
	@$(HVCTL) --state-dir $(STATE_DIR) host rm h2 >/dev/null 2>&1 || true
	@$(HVCTL) --state-dir $(STATE_DIR) host rm far >/dev/null 2>&1 || true
	@$(DEVHOST) stop $(H2_DIR) >/dev/null 2>&1 || true
	@$(DEVHOST) stop $(FAR_DIR) --remote 1 >/dev/null 2>&1 || true
	@$(MAKE) --no-print-directory demo-key
	@echo "== hvctl doctor"; $(HVCTL) --state-dir $(STATE_DIR) doctor || true
	@echo "== hvctl create demo (Debian base image, tenant acme: 512 MiB is exactly its quota, and it still fits)"
	$(TWO) create demo --image base --tenant acme --memory 512 --disk 2
	@echo "== hvctl list"; $(HVCTL) --state-dir $(STATE_DIR) list
	@echo "== the guest's boot output (hvctl console-log demo -n 3)"; \
	  $(HVCTL) --state-dir $(STATE_DIR) console-log demo -n 3
	@echo "== hvctl agent demo ping / info (virtio-serial, no guest network)"
	$(HVCTL) --state-dir $(STATE_DIR) agent demo ping
	$(HVCTL) --state-dir $(STATE_DIR) agent demo info
	@echo "== tenant acme runs a command over SSH with its own key (host key pinned by hvctl)"
	$(HVCTL) --state-dir $(STATE_DIR) exec demo -i $(DEMO_KEY) -- sh -c 'echo "hello from $$(hostname), kernel $$(uname -r)"'
	@echo "== a second host: a private libvirtd on this machine (h2), registered with hvctl"
	@$(DEVHOST) start $(H2_DIR) --no-cgroups --hide-kvm auto \
	  --probe-image "$$(ls -d $(STATE_DIR)/images/minimal@* | tail -1)" >/dev/null
	$(HVCTL) --state-dir $(STATE_DIR) host add h2 "$$($(DEVHOST) uri $(H2_DIR))"
	@echo "== hvctl migrate demo --to h2: live, with progress from libvirt's job stats"
	$(HVCTL) --state-dir $(STATE_DIR) migrate demo --to h2 --max-downtime 300
	@echo "== the same guest, not rebooted, answers the tenant on h2"
	$(HVCTL) --state-dir $(STATE_DIR) exec demo -i $(DEMO_KEY) -- sh -c 'echo "still $$(hostname), up $$(cut -d. -f1 /proc/uptime) s"'
	$(HVCTL) --state-dir $(STATE_DIR) list
	@echo "== a snapshot with the guest's memory; a file written after it is gone after the revert (through the agent)"
	$(HVCTL) --state-dir $(STATE_DIR) exec demo --agent -- sh -c 'echo before > /root/marker; sync'
	$(TWO) snapshot create demo warm --memory
	$(HVCTL) --state-dir $(STATE_DIR) exec demo --agent -- sh -c 'echo after > /root/marker; sync'
	$(TWO) snapshot revert demo warm
	@test "$$($(HVCTL) --state-dir $(STATE_DIR) exec demo --agent -- cat /root/marker)" = before && \
	  echo "the guest reads: before (the write after the snapshot is gone)"
	$(TWO) snapshot rm demo warm
	@echo "== hvctl metrics: the demo VM's series (Prometheus exposition)"
	@$(HVCTL) --state-dir $(STATE_DIR) metrics | grep 'vm="demo"' | grep -v '^#'
	@echo "== hvctl stop demo (graceful)"; $(HVCTL) --state-dir $(STATE_DIR) stop demo
	@echo "== hvctl destroy demo"; $(HVCTL) --state-dir $(STATE_DIR) destroy demo
	$(HVCTL) --state-dir $(STATE_DIR) host rm h2
	@$(DEVHOST) stop $(H2_DIR)
	@$(MAKE) --no-print-directory demo-remote
	@$(MAKE) --no-print-directory demo-quotas demo-workloads demo-networks demo-cloud
	@echo "== hvctl list"; $(HVCTL) --state-dir $(STATE_DIR) list

# A stock cloud image: imported as any downloaded qcow2 would be, booted by SeaBIOS and its own GRUB (it boots with
# OVMF too: test_vm_cloud), configured by cloud-init from hvctl's seed.
demo-cloud: daemons
	@$(HVCTL) --state-dir $(STATE_DIR) destroy cloud-demo >/dev/null 2>&1 || true
	@echo "== a stock-style Debian cloud image (systemd, cloud-init, GRUB on a partitioned disk), built from packages"
	@test -s $(STOCK_IMAGE) || $(DEVHOST).stockimage $(STOCK_IMAGE) --cache $(STATE_DIR)/images/.cache
	@echo "== hvctl image import debian-cloud (checked with qemu-img: standalone qcow2, size, sha256)"
	$(HVCTL) --state-dir $(STATE_DIR) image import debian-cloud $(STOCK_IMAGE) --sha256 "$$(sha256sum $(STOCK_IMAGE) | cut -d' ' -f1)"
	@echo "== hvctl create cloud-demo --image debian-cloud (up when cloud-init's final message reaches the console)"
	$(HVCTL) --state-dir $(STATE_DIR) create cloud-demo --image debian-cloud --memory 512 --disk 4 --boot-timeout 900
	$(HVCTL) --state-dir $(STATE_DIR) exec cloud-demo -- sh -c 'echo "$$(hostname): $$(cloud-init status), booted by $$(grep -o "BOOT_IMAGE=[^ ]*" /proc/cmdline)"'
	$(HVCTL) --state-dir $(STATE_DIR) destroy cloud-demo

# A tenant key pair for the demo tenant, made once (hvctl's own key generator; no ssh-keygen needed), and authorised.
demo-key: venv
	@if [ ! -f $(DEMO_KEY) ]; then mkdir -p $(dir $(DEMO_KEY)) && $(PY) -c 'import sys; from pathlib import Path; \
	  from hvctl.seed import generate_ed25519; p = generate_ed25519("acme-demo"); k = Path(sys.argv[1]); \
	  k.write_bytes(p.private_openssh); k.chmod(0o600); k.with_suffix(".pub").write_text(p.public_line + "\n")' \
	  $(DEMO_KEY); fi
	$(HVCTL) --state-dir $(STATE_DIR) key add acme $(DEMO_KEY:%=%.pub)

# A remote host: the tenant's VM is created there (the image uploaded into its storage pool over libvirt), reached
# by the tenant through a jump to the host, live-migrated back here with its disk (--copy-storage), and destroyed.
demo-remote: daemons
	$(HVCTL) --state-dir $(STATE_DIR) image build base
	@$(MAKE) --no-print-directory demo-key
	@$(HVCTL) --state-dir $(STATE_DIR) destroy far-demo >/dev/null 2>&1 || true
	@$(HVCTL) --state-dir $(STATE_DIR) host rm far >/dev/null 2>&1 || true
	@$(DEVHOST) stop $(FAR_DIR) --remote 1 >/dev/null 2>&1 || true
	@echo "== a remote-style host: libvirtd + sshd in their own network and mount namespaces, reached over ssh"
	@$(DEVHOST) start $(FAR_DIR) --remote 1 --hide $(STATE_DIR) >/dev/null
	$(HVCTL) --state-dir $(STATE_DIR) host add far "$$($(DEVHOST) uri $(FAR_DIR) --remote 1)"
	@echo "== the tenant's VM on far: its disk, seed and console log live in far's storage pool"
	$(TWO) create far-demo --host far --image base --tenant acme --memory 512 --disk 2 --boot-timeout 300
	$(HVCTL) --state-dir $(STATE_DIR) agent far-demo ping
	@echo "== tenant acme runs a command there, through a jump to far (its ssh, with -W), host key pinned"
	$(HVCTL) --state-dir $(STATE_DIR) exec far-demo -i $(DEMO_KEY) -- sh -c 'echo "hello from $$(hostname) on far" | tee /root/note'
	@echo "== the same route as an OpenSSH command line, for the tenant's own tools"
	$(HVCTL) --state-dir $(STATE_DIR) ssh far-demo -i $(DEMO_KEY) --print
	@echo "== hvctl migrate far-demo --to local --copy-storage: live, its overlay mirrored into a new disk here"
	$(HVCTL) --state-dir $(STATE_DIR) migrate far-demo --to local --copy-storage
	$(HVCTL) --state-dir $(STATE_DIR) exec far-demo -i $(DEMO_KEY) -- sh -c 'echo "$$(cat /root/note), now here; up $$(cut -d. -f1 /proc/uptime) s"'
	$(HVCTL) --state-dir $(STATE_DIR) list
	@echo "== hvctl destroy far-demo"; $(HVCTL) --state-dir $(STATE_DIR) destroy far-demo
	$(HVCTL) --state-dir $(STATE_DIR) host rm far
	@$(DEVHOST) stop $(FAR_DIR) --remote 1
	@rm -rf $(FAR_DIR)

# Two tenants under the quotas of policies/two-tenants.yaml: globex's third VM is refused with the numbers.
demo-quotas: daemons
	@for vm in acme-1 globex-1 globex-2 globex-3; do $(HVCTL) --state-dir $(STATE_DIR) destroy $$vm >/dev/null 2>&1 || true; done
	@echo "== hvctl policy check policies/two-tenants.yaml"; $(TWO) policy check
	@echo "== hvctl plan (dry run) for a burst of requests from both tenants"
	$(TWO) plan policies/example-requests.yaml
	@echo "== tenants create VMs under their quotas"
	$(TWO) create acme-1 --tenant acme --flavor tiny
	$(TWO) create globex-1 --tenant globex --flavor tiny
	$(TWO) create globex-2 --tenant globex --flavor tiny
	@echo "== globex-3 is over globex's quota:"; $(TWO) create globex-3 --tenant globex --flavor tiny || true
	$(TWO) host list
	@for vm in acme-1 globex-1 globex-2; do $(TWO) destroy $$vm; done

# Model workloads inside a VM built from the ml image (CPU torch under TCG: each run is mostly Python start-up).
demo-workloads: daemons
	$(HVCTL) --state-dir $(STATE_DIR) image build ml
	$(PY) -m guest.workloads make-media-samples $(STATE_DIR)/demo/media >/dev/null
	@$(HVCTL) --state-dir $(STATE_DIR) destroy ml-demo >/dev/null 2>&1 || true
	$(HVCTL) --state-dir $(STATE_DIR) create ml-demo --image ml --memory 1536 --disk 4 --boot-timeout 300
	@echo "== LLM inference inside the VM (tiny seeded Llama baked into the image)"
	$(HVCTL) --state-dir $(STATE_DIR) run ml-demo llm --prompt "The river" --max-new-tokens 8 --stream
	@echo "== multimodal perception inside the VM (text + image + audio fusion)"
	$(HVCTL) --state-dir $(STATE_DIR) run ml-demo perception --text "$$($(PY) -c 'import json,sys; print(json.load(open(sys.argv[1]))[0]["text"])' $(STATE_DIR)/demo/media/samples.json)" \
	  --image $(STATE_DIR)/demo/media/sample0.png --audio $(STATE_DIR)/demo/media/sample0.wav
	@echo "== a resident model server in the VM: OpenAI-compatible API, continuous batching, the model loaded once"
	$(HVCTL) --state-dir $(STATE_DIR) serve ml-demo start --model tiny-llm --max-seqs 8 --max-tokens 128 \
	  --local-port $(DEMO_SERVE_PORT)
	@echo "== the tenant runs the printed ssh -L line, and streams a chat completion from outside the VM"
	@$(HVCTL) --state-dir $(STATE_DIR) serve ml-demo forward --local-port $(DEMO_SERVE_PORT) --json \
	  | $(PY) -c 'import json, shlex, sys; print("exec", shlex.join(json.load(sys.stdin)["argv"]))' \
	  > $(STATE_DIR)/demo/forward.sh
	@sh -c 'sh $(STATE_DIR)/demo/forward.sh </dev/null >/dev/null 2>&1 & echo $$! > $(STATE_DIR)/demo/forward.pid'
	$(DEVHOST).tenant wait-port $(DEMO_SERVE_PORT)
	$(DEVHOST).tenant chat --port $(DEMO_SERVE_PORT) --model tiny-llm --message "The river" \
	  | tee $(STATE_DIR)/demo/answer-before
	@echo "== the same server through the agent channel (no guest network)"
	$(HVCTL) --state-dir $(STATE_DIR) generate ml-demo --prompt "The river" --max-tokens 8
	@echo "== fine-tune in the same VM (self-supervised), export it, and swap the served weights live"
	$(HVCTL) --state-dir $(STATE_DIR) run ml-demo train --objective ssl --steps 8 --checkpoint-every 8 \
	  --export /var/lib/hvctl-agent/tuned
	$(HVCTL) --state-dir $(STATE_DIR) serve ml-demo reload --model /var/lib/hvctl-agent/tuned
	$(DEVHOST).tenant chat --port $(DEMO_SERVE_PORT) --model tiny-llm --message "The river" \
	  | tee $(STATE_DIR)/demo/answer-after
	@if cmp -s $(STATE_DIR)/demo/answer-before $(STATE_DIR)/demo/answer-after; then \
	  echo "the answer did not change after the reload"; exit 1; fi; echo "== the answer changed with the weights"
	$(HVCTL) --state-dir $(STATE_DIR) serve ml-demo status
	@kill $$(cat $(STATE_DIR)/demo/forward.pid) 2>/dev/null || true
	$(HVCTL) --state-dir $(STATE_DIR) serve ml-demo stop
	$(HVCTL) --state-dir $(STATE_DIR) destroy ml-demo

# Tenant networks and distributed training, on a remote-style host (its bridges and firewall in its own namespaces):
# acme's two ml VMs on network lab train one model data-parallel; globex's VM on network red cannot reach them.
LAB_DIR := $(DAEMON_DIR)-lab
NETS := $(HVCTL) --state-dir $(STATE_DIR) --policy policies/tenant-networks.yaml
demo-networks: daemons
	$(HVCTL) --state-dir $(STATE_DIR) image build ml
	$(HVCTL) --state-dir $(STATE_DIR) image build base
	@for vm in lab-1 lab-2 red-1; do $(HVCTL) --state-dir $(STATE_DIR) destroy $$vm >/dev/null 2>&1 || true; done
	@for net in lab red; do $(HVCTL) --state-dir $(STATE_DIR) network rm $$net >/dev/null 2>&1 || true; done
	@$(HVCTL) --state-dir $(STATE_DIR) host rm lab >/dev/null 2>&1 || true
	@$(DEVHOST) stop $(LAB_DIR) --remote 2 >/dev/null 2>&1 || true
	@$(DEVHOST) start $(LAB_DIR) --remote 2 --hide $(STATE_DIR) >/dev/null
	$(HVCTL) --state-dir $(STATE_DIR) host add lab "$$($(DEVHOST) uri $(LAB_DIR) --remote 2)"
	@echo "== tenant networks: lab for acme, red for globex (isolated L2 segments, addresses from hvctl's IPAM)"
	$(NETS) network create lab --tenant acme --subnet 10.96.40.0/24
	$(NETS) network create red --tenant globex --subnet 10.96.41.0/24
	$(NETS) create lab-1 --host lab --image ml --tenant acme --memory 1536 --disk 4 --net lab --boot-timeout 600
	$(NETS) create lab-2 --host lab --image ml --tenant acme --memory 1536 --disk 4 --net lab --boot-timeout 600
	$(NETS) create red-1 --host lab --image base --tenant globex --memory 384 --disk 2 --net red --boot-timeout 300
	$(NETS) network list
	@echo "== data-parallel training over lab: torch's elastic launcher in each VM, rendezvous on lab-1, gloo"
	$(NETS) run --vms lab-1,lab-2 train --distributed --steps 6 --checkpoint-every 3 --batch-size 4
	@echo "== each VM's ranks reported every step (hvctl logs lab-2, progress lines)"
	@$(HVCTL) --state-dir $(STATE_DIR) logs lab-2 | $(PY) -c 'import json, sys; \
	  [print("lab-2: rank {rank} of {world_size}, step {step}, loss {loss:.4f}".format(**json.loads(line)["progress"])) \
	   for line in sys.stdin if line.startswith("{\"progress\"")]'
	@echo "== lab-2 reaches lab-1 on lab; globex's red-1 does not"
	@a1="$$($(HVCTL) --state-dir $(STATE_DIR) show lab-1 --json | $(PY) -c 'import json,sys; print(json.load(sys.stdin)["spec"]["network"]["address"].split("/")[0])')"; \
	  $(HVCTL) --state-dir $(STATE_DIR) exec lab-2 --agent -- busybox ping -c 2 -W 3 $$a1 | tail -2 && \
	  if $(HVCTL) --state-dir $(STATE_DIR) exec red-1 --agent -- busybox ping -c 2 -W 3 $$a1 >/dev/null; then \
	    echo "red-1 reached lab-1: isolation broken"; exit 1; else echo "red-1 -> $$a1: no answer (isolated)"; fi
	@for vm in lab-1 lab-2 red-1; do $(HVCTL) --state-dir $(STATE_DIR) destroy $$vm; done
	$(HVCTL) --state-dir $(STATE_DIR) network rm lab
	$(HVCTL) --state-dir $(STATE_DIR) network rm red
	$(HVCTL) --state-dir $(STATE_DIR) host rm lab
	@$(DEVHOST) stop $(LAB_DIR) --remote 2
	@rm -rf $(LAB_DIR)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m 'not vm' $(PYTEST_ARGS)

test-vm: venv
	$(PY) -m pytest -m vm $(PYTEST_ARGS)

lint: venv
	.venv/bin/ruff check hvctl vfio images guest tests benchmarks
	.venv/bin/mypy

bench: daemons
	$(PY) benchmarks/bench_create.py
	$(PY) benchmarks/bench_boot.py
	$(PY) benchmarks/bench_migrate.py
	$(PY) benchmarks/bench_place.py
	$(PY) benchmarks/bench_ledger.py
