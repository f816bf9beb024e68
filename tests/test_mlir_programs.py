"""The MLIR programs built by two processes (``zaya_export.mlir_programs``): the split of the work, the forked
child's build and its failures, and the merge of two modules into one that IREE compiles and runs correctly."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from zaya_export.mlir_export import PARAM_SCOPE, externalize_weights
from zaya_export.mlir_programs import (ChildBuild, MlirBuildError, MlirProgram, build_module, collect,
                                       merge_modules, ops_per_function, split)


N = 2048  # over iree-turbine's inline limit (1024 elements): each constant becomes a global of its own


class Scaled(torch.nn.Module):
    """x·w + c with a parameter every program shares and a constant of each program's own. The importer names
    both parts' constants alike (``@__auto.constant_2048_torch.float32``, its resource likewise), so a merge
    that matched names would mix them up."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, N))
        self.constant = torch.arange(N, dtype=torch.float32) + offset  # a tensor constant, not a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w + self.constant


def program(name: str, offset: float, cost: float = 1.0) -> MlirProgram:
    def trace() -> torch.export.ExportedProgram:
        module = Scaled(offset)
        externalize_weights(module)  # a parameter global, as the model's weights are
        return torch.export.export(module, (torch.ones(N),))

    return MlirProgram(name, trace, static_length=True, cost=cost)


def test_split_balances_the_cost_and_keeps_the_order() -> None:
    programs = [program(n, 0.0, cost) for n, cost in
                [("a", 1.0), ("a_b1", 1.8), ("b", 1.0), ("b_b1", 1.8), ("commit", 0.1), ("c", 1.0)]]
    parent, child = split(programs, parent_extra=1.0, workers=2)
    assert sorted(p.name for p in parent + child) == sorted(p.name for p in programs)
    loads = [1.0 + sum(p.cost for p in parent), sum(p.cost for p in child)]
    assert abs(loads[0] - loads[1]) <= 1.8  # within the largest program
    order = [p.name for p in programs]
    for share in (parent, child):
        assert [p.name for p in share] == [n for n in order if n in {p.name for p in share}]
    assert split(programs, parent_extra=1.0, workers=1) == (programs, [])


def test_two_parts_merge_into_one_module_iree_runs(tmp_path) -> None:  # noqa: ANN001
    build_module([program("plus", 10.0)], tmp_path / "a.mlir")
    child = ChildBuild([program("minus", -5.0)], tmp_path / "b.mlir")
    merge_modules([tmp_path / "a.mlir", child.wait()], tmp_path / "merged.mlir")
    text = (tmp_path / "merged.mlir").read_text()
    assert text.count("#flow.parameter.named") == 1  # the shared parameter, once
    assert text.count("util.global private @__auto.constant_2048") == 2  # each part's constant, told apart
    assert set(ops_per_function(text)) == {"plus", "minus"}

    import iree.compiler as ic
    import iree.runtime as rt

    vmfb = ic.compile_file(str(tmp_path / "merged.mlir"), input_type="torch", target_backends=["llvm-cpu"])
    config = rt.Config("local-sync")
    w = np.linspace(-1.0, 1.0, N, dtype=np.float32)
    index = rt.ParameterIndex()
    index.add_buffer("w", w.tobytes())
    params = rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope=PARAM_SCOPE))
    ctx = rt.SystemContext(config=config, vm_modules=[
        params, rt.create_hal_module(config.vm_instance, config.device),
        rt.VmModule.copy_buffer(config.vm_instance, vmfb)])
    x = np.random.default_rng(0).standard_normal(N).astype(np.float32)
    base = np.arange(N, dtype=np.float32)
    np.testing.assert_allclose(ctx.modules.module["plus"](x).to_host(), x * w + base + 10, rtol=1e-6)
    np.testing.assert_allclose(ctx.modules.module["minus"](x).to_host(), x * w + base - 5, rtol=1e-6)


def test_merge_refuses_two_definitions_of_one_symbol(tmp_path) -> None:  # noqa: ANN001
    build_module([program("f", 1.0)], tmp_path / "a.mlir")
    build_module([program("f", 2.0)], tmp_path / "b.mlir")
    with pytest.raises(MlirBuildError, match="two definitions of @f"):
        merge_modules([tmp_path / "a.mlir", tmp_path / "b.mlir"], tmp_path / "merged.mlir")


def failing() -> torch.export.ExportedProgram:
    raise ValueError("no such op\nsecond line")


def test_a_failure_in_the_child_names_the_program(tmp_path) -> None:  # noqa: ANN001
    child = ChildBuild([program("fine", 0.0), MlirProgram("broken", failing, static_length=False)],
                       tmp_path / "b.mlir")
    with pytest.raises(MlirBuildError, match=r"broken: tracing for MLIR failed: ValueError: no such op$"):
        child.wait()
    assert not (tmp_path / "b.mlir").exists()


def slow() -> torch.export.ExportedProgram:
    time.sleep(60)
    raise AssertionError("the child should have been killed")


def test_kill_stops_the_child(tmp_path) -> None:  # noqa: ANN001
    child = ChildBuild([MlirProgram("slow", slow, static_length=False)], tmp_path / "b.mlir")
    pid = child.pid
    start = time.perf_counter()
    child.kill()
    assert time.perf_counter() - start < 10
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    child.kill()  # a second kill (the export's cleanup after a failure) does nothing


def test_a_child_after_the_parent_filled_the_compiler_thread_pool(tmp_path) -> None:  # noqa: ANN001
    """The compiler library's thread pool survives a fork without its workers: the child's importer must not hand
    it work (it waited forever in the test suite, where earlier exports had used the pool)."""
    build_module([program(f"f{i}", float(i)) for i in range(8)], tmp_path / "many.mlir")
    merge_modules([tmp_path / "many.mlir"], tmp_path / "verified.mlir")  # a multithreaded verify of 8 functions
    child = ChildBuild([program("g", 1.0), program("h", 2.0)], tmp_path / "b.mlir")
    built = child.wait(stall_s=60)
    assert built is not None and set(ops_per_function(built.read_text())) == {"g", "h"}


def test_a_stalled_child_is_stopped_and_its_share_built_here(tmp_path) -> None:  # noqa: ANN001
    stuck = MlirProgram("stuck", slow, static_length=False)
    child = ChildBuild([stuck], tmp_path / "b.mlir")
    pid = child.pid
    assert child.wait(stall_s=1.0) is None and child.pid == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    child = ChildBuild([stuck], tmp_path / "c.mlir")
    child.programs = [program("g", 1.0)]  # what the parent builds instead (the real one would stall again)
    messages: list[str] = []
    built = collect(child, stall_s=1.0, status=messages.append)
    assert set(ops_per_function(built.read_text())) == {"g"}
    assert any("made no progress for 1 s" in m for m in messages)
