"""VMSpec refuses anything that could reach XML, a path or a shell, and sizes out of bounds, in one line."""

import json

import pytest
from pydantic import ValidationError

from hvctl.errors import InvalidSpec
from hvctl.spec import MAX_MEMORY_MIB, VMSpec


@pytest.mark.parametrize("name", [
    "Upper", "1starts-with-digit", "has space", "semi;colon", "quote'x", 'dq"x', "slash/x", "../etc", "dot.name",
    "<tag>", "amp&x", "$(reboot)", "a" * 64, "", "new\nline", "ünicode",
])
def test_bad_names_are_refused_with_the_rule(name: str) -> None:
    with pytest.raises(InvalidSpec) as exc:
        VMSpec.parse(name=name)
    assert "name" in exc.value.message
    assert "[a-z][a-z0-9-]{0,62}" in exc.value.message
    assert "\n" not in exc.value.message


@pytest.mark.parametrize("field,value", [
    ("vcpus", 0), ("vcpus", 100_000), ("memory_mib", 0), ("memory_mib", 16), ("memory_mib", MAX_MEMORY_MIB + 1),
    ("disk_gib", 0), ("disk_gib", 10**7), ("vcpus", -1), ("cpu_limit", 0), ("io_weight", 5), ("numa_node", -1),
])
def test_sizes_out_of_bounds_are_refused(field: str, value: int) -> None:
    with pytest.raises(InvalidSpec) as exc:
        VMSpec.parse(name="ok", **{field: value})
    assert field in exc.value.message and str(value) in exc.value.message


def test_image_tenant_and_gpu_model_are_checked_too() -> None:
    for bad in ({"image": "../x"}, {"tenant": "Bad Tenant"}, {"gpus": {"count": 1, "model": "a'b"}},
                {"gpus": {"count": 99}}, {"workload": "bitcoin"}, {"unknown_field": 1}):
        with pytest.raises(InvalidSpec):
            VMSpec.parse(name="ok", **bad)


def test_cpu_limit_cannot_exceed_vcpus() -> None:
    with pytest.raises(InvalidSpec, match="cpu_limit 3.0 exceeds the VM's 2 vCPU"):
        VMSpec.parse(name="ok", vcpus=2, cpu_limit=3.0)


def test_spec_is_frozen_and_has_sane_defaults() -> None:
    spec = VMSpec.parse(name="web-1", gpus={"count": 1, "model": "H100"})
    assert (spec.vcpus, spec.memory_mib, spec.disk_gib, spec.image, spec.host) == (1, 256, 1, "minimal", None)
    assert spec.gpus.count == 1
    with pytest.raises(ValidationError, match="frozen"):
        spec.vcpus = 4  # type: ignore[misc]


def test_one_formatter_says_what_pydantic_refused_on_both_sides_of_the_channel() -> None:
    """guest.validation is the one place a pydantic refusal becomes words, for the controller and the guest alike:
    every bad field, its value when it is a scalar, and the rule (a pattern said as the pattern)."""
    from pydantic import ValidationError

    from guest import rpc
    from guest.validation import describe, problems
    from hvctl.spec import VMSpec

    with pytest.raises(ValidationError) as refused:
        VMSpec.model_validate({"name": "Bad Name", "vcpus": 0, "gpus": {"count": "x"}})
    said, found = describe(refused.value), problems(refused.value)
    assert "name 'Bad Name': must match [a-z][a-z0-9-]{0,62}" in said
    assert "vcpus 0: Input should be greater than or equal to 1" in said and "gpus.count 'x':" in said
    assert [p.loc for p in found][:2] == [("name",), ("vcpus",)]
    with pytest.raises(ValidationError) as refused:
        rpc.ServeGenerateParams.model_validate({"model": "m", "prompt": "p", "max_tokens": 0})
    assert describe(refused.value).startswith("max_tokens 0: ")


def test_a_spec_recorded_by_an_older_hvctl_with_the_retired_workload_field_still_reads() -> None:
    old = json.loads(VMSpec.parse(name="old-1").model_dump_json()) | {"workload": None}
    assert VMSpec.model_validate(old) == VMSpec.parse(name="old-1")
    with pytest.raises(ValidationError, match="workload"):
        VMSpec.model_validate(old | {"workload": "llm"})  # never set by any hvctl: not silently dropped
