"""hvctl key rm and hvctl agent NAME rotate-token: taking access away, in the ledger, in each VM's seed (its next
boot) and, through the agent, in the running guest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guest import rpc
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.designer import nic_mac
from hvctl.errors import HvctlError, InvalidSpec, NotFound
from hvctl.host import DomainState
from hvctl.ledger import OperationRecord, VMRecord
from hvctl.ops import Say
from hvctl.ops.incarnation import authorized_keys_for
from hvctl.ops.intent import operation
from hvctl.seed import new_agent_token, rewrite_seed

AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
# Drops one exact line from authorized_keys. The key travels as "$1", never inside the script's text.
_DROP_LINE = 'f="$0"; grep -vxF -- "$1" "$f" > "$f.hvctl-new"; chmod 600 "$f.hvctl-new"; mv "$f.hvctl-new" "$f"'


def _rewrite_seed(ctx: Context, record: VMRecord, token: str, dropping: str | None = None) -> None:
    """The VM's seed written again with the keys the ledger authorises (less ``dropping``) and ``token``."""
    if record.seed is None or not record.seed.exists():
        return
    spec = record.spec
    keys = [k for k in authorized_keys_for(ctx, spec) if k != dropping]
    rewrite_seed(record.seed, record.name, keys, record.host_pubkey or "", token,
                 (nic_mac(spec.name), spec.network) if spec.network else None)


def _running_agent(ctx: Context, record: VMRecord) -> AgentClient | None:
    if record.agent_token is None or ctx.host(record.host).state(record.name) is not DomainState.RUNNING:
        return None
    return ctx.agent(record.host, record.name, record.agent_token, timeout=30)


@dataclass(frozen=True)
class KeyRevoked:
    """What revoking a tenant's key did in one of its VMs: its seed rewritten (the next boot), the running guest's
    authorized_keys changed (``live``), or why not (``problem``)."""

    vm: str
    seed: bool = False
    live: bool = False
    problem: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "seed": self.seed, "live": self.live, "problem": self.problem}


@dataclass(frozen=True)
class KeyRemoval:
    tenant: str
    vms: tuple[KeyRevoked, ...]

    def as_json(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "vms": [vm.as_json() for vm in self.vms]}


@dataclass(frozen=True)
class TokenRotated:
    vm: str
    live: bool  # the running agent took it now; otherwise at the VM's next start

    def as_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "rotated": True, "live": self.live}


def remove_tenant_key(ctx: Context, tenant: str, pubkey: str,
                      say: Say = lambda _: None) -> KeyRemoval:
    """Forget ``pubkey`` for ``tenant``, rewrite the seed of each of the tenant's VMs without it, and remove it
    from the running ones' authorized_keys through their agents. A VM that cannot be reached now keeps the key
    until its next boot; the result says which.

    The ledger forgets the key last: killed part way, the key is still listed, and `key rm` run again takes it out
    of every VM (dropping a line that is already gone changes nothing)."""
    if pubkey not in {k for _, k in ctx.ledger.keys.all(tenant)}:
        raise NotFound(f"that key is not authorised for tenant {tenant}", hint=f"`hvctl key list {tenant}`")
    vms = []
    for record in (r for r in ctx.ledger.vms.all() if r.tenant == tenant):
        say(f"removing the key from {record.name}")
        seed = live = False
        problem = None
        try:
            _rewrite_seed(ctx, record, record.agent_token or "", dropping=pubkey)
            seed = True
            agent = _running_agent(ctx, record)
            if agent is not None:
                done = agent.typed("exec", rpc.ExecResult,
                                   rpc.ExecParams(argv=["sh", "-c", _DROP_LINE, AUTHORIZED_KEYS, pubkey]))
                if done.exit_code != 0:
                    raise HvctlError(f"removing it from {AUTHORIZED_KEYS} failed: {done.stderr.strip()}")
                live = True
        except (HvctlError, AgentError) as exc:
            problem = exc.message
        outcome = KeyRevoked(record.name, seed, live, problem)
        ctx.ledger.events.log(record.name, record.host, "key.removed",
                             f"a key of tenant {tenant} was removed" + (f" ({problem})" if problem else ""),
                             outcome.as_json())
        vms.append(outcome)
    ctx.ledger.keys.remove(tenant, pubkey)
    return KeyRemoval(tenant, tuple(vms))


def rotate_agent_token(ctx: Context, name: str) -> TokenRotated:
    """Give a VM's agent a new token: the running agent switches (authenticated by the old one), then the ledger
    and the seed (the next boot) take it. A stopped VM takes it at its next start."""
    record = ctx.ledger.vms.get(name)
    if record.agent_token is None:
        raise InvalidSpec(f"VM {name} has no agent (its image was built without one)")
    token = new_agent_token()
    with operation(ctx, name, "rotate-token") as op:
        # The new token is in the intent before the guest has it: killed after the switch, the repair can ask the
        # guest which of the two it holds (reconcile_rotation).
        op.step("chosen", token=token)
        agent = _running_agent(ctx, record)
        if agent is not None:
            try:
                agent.typed("token.rotate", rpc.TokenRotated, rpc.TokenRotateParams(token=token))
            except AgentError as exc:
                raise AgentError(f"the agent of {name} did not take a new token; the old one stays: {exc.message}",
                                 code=exc.code) from None
            op.step("switched")
        ctx.ledger.vms.set_agent_token(name, token)
        op.step("recorded")
        _rewrite_seed(ctx, record, token)
    return TokenRotated(name, agent is not None)


def reconcile_rotation(ctx: Context, op: OperationRecord) -> str:
    """An interrupted token rotation. The ledger already has the new token (killed after recording it): the seed
    is written again with it, so the next boot agrees. Otherwise the running guest is asked, with the new token,
    whether it took it: if it did, the ledger and the seed take it now; if it answers to the old one, or is not
    running (its next boot reads the seed, which still has the old one), there is nothing to mend."""
    vm, token = op.vm, op.data.get("token")
    try:
        record = ctx.ledger.vms.get(vm)
    except NotFound:
        ctx.ledger.operations.end(vm)
        return "the VM is gone"
    if token and record.agent_token != token and ctx.host(record.host).state(vm) is DomainState.RUNNING:
        try:
            ctx.agent(record.host, vm, token, timeout=30).call("ping")
        except AgentError as exc:
            if exc.code != rpc.ErrorCode.UNAUTHORIZED:
                return f"undecided: the agent of {vm} did not answer ({exc.message})"
            ctx.ledger.operations.end(vm)
            return "the guest kept its old token: nothing to mend"
        ctx.ledger.vms.set_agent_token(vm, token)
        record = ctx.ledger.vms.get(vm)
    if token and record.agent_token == token:
        _rewrite_seed(ctx, record, token)
        ctx.ledger.operations.end(vm)
        return "the guest holds the new token: the ledger and the seed have it too"
    ctx.ledger.operations.end(vm)
    return "the rotation had not reached the guest: nothing to mend"
