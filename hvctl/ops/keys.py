"""hvctl key rm and hvctl agent NAME rotate-token: taking access away, in the ledger, in each VM's seed (its next
boot) and, through the agent, in the running guest."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guest import rpc
from hvctl.agent_client import AgentClient, AgentError
from hvctl.context import Context
from hvctl.designer import nic_mac
from hvctl.errors import HvctlError, InvalidSpec, NotFound
from hvctl.host import DomainState
from hvctl.ledger import VMRecord
from hvctl.ops.incarnation import authorized_keys_for
from hvctl.seed import new_agent_token, rewrite_seed

AUTHORIZED_KEYS = "/root/.ssh/authorized_keys"
# Drops one exact line from authorized_keys. The key travels as "$1", never inside the script's text.
_DROP_LINE = 'f="$0"; grep -vxF -- "$1" "$f" > "$f.hvctl-new"; chmod 600 "$f.hvctl-new"; mv "$f.hvctl-new" "$f"'


def _rewrite_seed(ctx: Context, record: VMRecord, token: str) -> None:
    if record.seed is None or not record.seed.exists():
        return
    spec = record.spec
    rewrite_seed(record.seed, record.name, authorized_keys_for(ctx, spec), record.host_pubkey or "", token,
                 (nic_mac(spec.name), spec.network) if spec.network else None)


def _running_agent(ctx: Context, record: VMRecord) -> AgentClient | None:
    if record.agent_token is None or ctx.host(record.host).state(record.name) is not DomainState.RUNNING:
        return None
    return ctx.agent(record.host, record.name, record.agent_token, timeout=30)


def remove_tenant_key(ctx: Context, tenant: str, pubkey: str,
                      say: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Forget ``pubkey`` for ``tenant``, rewrite the seed of each of the tenant's VMs without it, and remove it
    from the running ones' authorized_keys through their agents. A VM that cannot be reached now keeps the key
    until its next boot; the result says which."""
    if not ctx.ledger.remove_tenant_key(tenant, pubkey):
        raise NotFound(f"that key is not authorised for tenant {tenant}", hint=f"`hvctl key list {tenant}`")
    vms = []
    for record in (r for r in ctx.ledger.list_vms() if r.tenant == tenant):
        say(f"removing the key from {record.name}")
        outcome: dict[str, Any] = {"vm": record.name, "seed": False, "live": False, "problem": None}
        try:
            _rewrite_seed(ctx, record, record.agent_token or "")
            outcome["seed"] = True
            agent = _running_agent(ctx, record)
            if agent is not None:
                done = agent.typed("exec", rpc.ExecResult,
                                   rpc.ExecParams(argv=["sh", "-c", _DROP_LINE, AUTHORIZED_KEYS, pubkey]))
                if done.exit_code != 0:
                    raise HvctlError(f"removing it from {AUTHORIZED_KEYS} failed: {done.stderr.strip()}")
                outcome["live"] = True
        except (HvctlError, AgentError) as exc:
            outcome["problem"] = exc.message
        ctx.ledger.log_event(record.name, record.host, "key.removed",
                             f"a key of tenant {tenant} was removed" + (f" ({outcome['problem']})"
                                                                        if outcome["problem"] else ""), outcome)
        vms.append(outcome)
    return {"tenant": tenant, "vms": vms}


def rotate_agent_token(ctx: Context, name: str) -> dict[str, Any]:
    """Give a VM's agent a new token: the running agent switches (authenticated by the old one), then the ledger
    and the seed (the next boot) take it. A stopped VM takes it at its next start."""
    record = ctx.ledger.get_vm(name)
    if record.agent_token is None:
        raise InvalidSpec(f"VM {name} has no agent (its image was built without one)")
    token = new_agent_token()
    agent = _running_agent(ctx, record)
    if agent is not None:
        try:
            agent.typed("token.rotate", rpc.TokenRotated, rpc.TokenRotateParams(token=token))
        except AgentError as exc:
            raise AgentError(f"the agent of {name} did not take a new token; the old one stays: {exc.message}",
                             code=exc.code) from None
    # Not yet crash-consistent (the crash-consistency issue journals this): killed after the agent switched and
    # before the ledger did, the guest holds a token the ledger lacks until a stop and start (the seed still has the
    # old one); killed between the ledger and the seed, the next boot brings the old token back.
    ctx.ledger.set_agent_token(name, token)
    _rewrite_seed(ctx, record, token)
    return {"vm": name, "rotated": True, "live": agent is not None}
