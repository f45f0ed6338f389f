"""Warm workload starts (guest/warm.py; on in the guest's agent, off by default in Agent.warm_starts): the real
agent forks the real train workload from a forkserver that imported torch and transformers once, and the forked
workload is what a fresh process would have been."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from guest import warm
from guest.agent import Agent

TOKEN = "t"
ARGS = ["--objective", "ssl", "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--checkpoint-every", "0",
        "--no-resume"]


def call(agent: Agent, method: str, **params: object) -> dict[str, object]:
    reply = agent.handle_line(json.dumps({"v": 1, "id": 1, "token": TOKEN, "method": method,
                                          "params": params}).encode())
    assert reply.ok, reply.error
    assert reply.result is not None
    return reply.result


def finished(agent: Agent, wid: str) -> dict[str, object]:
    deadline = time.monotonic() + 240  # a hang guard: the first warm start waits for the forkserver's imports
    while (status := call(agent, "workload.status", id=wid))["state"] == "running":
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def warm_agent(workdir: Path) -> Agent:
    """An agent with warm starts on whose forkserver is ready (its first workload would start cold)."""
    assert warm.available()  # torch and transformers are in this venv, as in an `ml` guest
    agent = Agent(token=TOKEN, workdir=workdir, warm_starts=True)
    starter = agent._warm_starter()
    assert starter is not None and starter.ready.wait(240), "the forkserver never became ready"
    return agent


def test_workloads_start_cold_until_the_server_is_warm_which_warms_at_the_idle_class(tmp_path: Path) -> None:
    agent = Agent(token=TOKEN, workdir=tmp_path, warm_starts=True)
    first = str(call(agent, "workload.start", kind="train", args=[*ARGS, "--checkpoint-dir", str(tmp_path / "a")])
                ["id"])
    assert isinstance(agent._running[first].proc, subprocess.Popen)  # the server is only starting its imports
    assert agent._warm is not None and agent._warm.ready.wait(240)
    assert finished(agent, first)["state"] == "succeeded"
    wid = str(call(agent, "workload.start", kind="train", args=["--objective", "ssl", "--steps", "1000000",
                                                                "--checkpoint-dir", str(tmp_path / "b")])["id"])
    proc = agent._running[wid].proc
    assert isinstance(proc, warm.WarmProcess)
    server = parent_of(proc.pid)
    assert os.sched_getscheduler(server) == os.SCHED_IDLE  # the server's imports took only idle time
    assert os.sched_getscheduler(proc.pid) == os.SCHED_OTHER  # the workload runs at the normal class
    assert call(agent, "workload.cancel", id=wid)["state"] == "cancelled"


def test_workloads_fork_from_one_server_in_sessions_of_their_own_and_compute_what_a_fresh_process_does(
        tmp_path: Path) -> None:
    agent = warm_agent(tmp_path / "warm")
    servers, losses = set(), []
    for _ in range(2):
        wid = str(call(agent, "workload.start", kind="train", args=[*ARGS, "--checkpoint-dir", str(tmp_path / "w")])
                  ["id"])
        proc = agent._running[wid].proc
        assert isinstance(proc, warm.WarmProcess)
        try:
            servers.add(parent_of(proc.pid))  # the forkserver, not the agent
            assert os.getpgid(proc.pid) == os.getsid(proc.pid) == proc.pid  # cancel's killpg reaches all it starts
        except ProcessLookupError:
            pass  # it already finished: a forked step takes a tenth of a second
        status = finished(agent, wid)
        assert status["state"] == "succeeded" and status["exit_code"] == 0, status
        losses.append(status["result"]["losses"])  # type: ignore[index]
    assert len(servers) <= 1 and os.getpid() not in servers

    cold = Agent(token=TOKEN, workdir=tmp_path / "cold")  # the default
    wid = str(call(cold, "workload.start", kind="train", args=[*ARGS, "--checkpoint-dir", str(tmp_path / "c")])["id"])
    assert isinstance(cold._running[wid].proc, subprocess.Popen)
    status = finished(cold, wid)
    assert losses == [status["result"]["losses"]] * 2  # type: ignore[index]


def test_a_forked_workload_reports_a_bad_request_and_a_cancel_as_a_fresh_one_does(tmp_path: Path) -> None:
    agent = warm_agent(tmp_path)
    bad = str(call(agent, "workload.start", kind="train", args=["--steps", "0", "--objective", "ssl"])["id"])
    status = finished(agent, bad)
    assert status["state"] == "failed" and status["exit_code"] == 2 and "steps" in str(status["error"]), status
    endless = str(call(agent, "workload.start", kind="train", args=["--objective", "ssl", "--steps", "1000000",
                                                                   "--checkpoint-dir", str(tmp_path / "e")])["id"])
    deadline = time.monotonic() + 240
    while '{"progress"' not in str(call(agent, "workload.logs", id=endless)["data"]):
        assert time.monotonic() < deadline, call(agent, "workload.logs", id=endless)
        time.sleep(0.05)
    pid = agent._running[endless].proc.pid
    assert call(agent, "workload.cancel", id=endless)["state"] == "cancelled"
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_a_forkserver_that_died_is_warmed_again_and_meanwhile_workloads_start_cold(tmp_path: Path) -> None:
    agent = warm_agent(tmp_path)
    starter = agent._warm
    assert starter is not None and starter.usable()
    server = warm.forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    os.kill(server, 9)  # as the kernel's OOM killer would
    while not os.path.exists(f"/proc/{server}") or Path(f"/proc/{server}/stat").read_text().split()[2] != "Z":
        time.sleep(0.01)  # until it is a zombie: dead, not yet reaped
    cold = str(call(agent, "workload.start", kind="train", args=[*ARGS, "--checkpoint-dir", str(tmp_path / "a")])["id"])
    assert isinstance(agent._running[cold].proc, subprocess.Popen)  # not a fork that would wait for a new server
    assert finished(agent, cold)["state"] == "succeeded"
    assert starter.ready.wait(240), "the forkserver was not started again"
    assert warm.forkserver._forkserver._forkserver_pid != server  # type: ignore[attr-defined]
    forked = str(call(agent, "workload.start", kind="train", args=[*ARGS, "--checkpoint-dir", str(tmp_path / "b")])
                 ["id"])
    assert isinstance(agent._running[forked].proc, warm.WarmProcess)
    assert finished(agent, forked)["state"] == "succeeded"
