"""The contract is pinned: change a selector's name or arity in the API data and vzkit fails.

A scenario drives every adapter path (config building, lifecycle, balloon, vsock, save/
restore, run loops, NSError/NSData helpers) against the stand-in built from the vendored
``api.json``, recording each selector used. Then, for every one of them, the data is
mutated — the selector renamed, its argument list changed, a property made read-only, or
its availability raised — and the scenario must hit a contract violation. A stand-in that
accepted anything would let these mutants survive.

The backend's calls are mutated too (``FakeRuntime.rewrite``): one argument at a time, every
nonnull argument the scenario passes becomes ``None``, every pointer argument a plain Python
object (the opaque ``dispatch_queue_t`` among them), and every array or dictionary gains an
element of the wrong class; the stand-in must name that argument each time.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._support import ARM64_IMAGE
from .fakeobjc import (
    FakeRuntime,
    guest_connect,
    installed,
    load_raw,
    load_raw_nullability,
    write_fake_ipsw,
)
from .fakeobjc._spec import MethodSpec

pytestmark = pytest.mark.contract
Mutation = Callable[[dict[str, Any]], None]
Rewrite = Callable[[MethodSpec, tuple[Any, ...]], tuple[Any, ...]]
DISPATCH_USED = ("dispatch_queue_create", "dispatch_sync", "dispatch_async")
CF_USED = ("CFRunLoopRunInMode",)


def scenario(root: Path, rt: FakeRuntime) -> None:
    """Every seed function, once, the happy path (then the macOS-guest half)."""
    for name in ("vmlinuz", "initrd", "disk.img", "cd.iso"):
        (root / name).write_bytes(ARM64_IMAGE)
    (root / "share").mkdir(exist_ok=True)
    cfg = vzkit.LinuxVMConfig(
        kernel_path=root / "vmlinuz",
        initrd_path=root / "initrd",
        disk_path=root / "disk.img",
        iso_path=root / "cd.iso",
        state_dir=root / "state",
        volumes=(vzkit.VolumeMount(root / "share", "code", True),),
        headless=False,
    )
    config = vzb.build_linux_vm_config(cfg)
    vzb.build_linux_vm_config(cfg)  # reuse the persisted machine identifier
    vzb.validate_config(config)
    efi = cfg.replace(kernel_path=None, initrd_path=None, state_dir=root / "efi")
    vzb.build_linux_vm_config(efi)
    vzb.build_linux_vm_config(efi)  # reuse the variable store
    vzb.create_network_device(vzkit.parse_network_mode("bridged:en0"))
    vzb.create_mac_graphics_config([vzkit.default_display_config()])
    vzb.create_stdio_serial_console()
    vzb.add_memory_balloon_device(config)
    queue = vzb.Queue("mutant")
    queue.async_(lambda: None)
    vm = vzb.create_vm(config, queue)
    assert vzb.can_start(queue, vm)
    vzb.start_vm(queue, vm).wait(2)
    assert vzb.vm_state(queue, vm) is vzkit.VMState.RUNNING
    assert vzb.can_stop(queue, vm)
    assert vzb.can_pause(queue, vm)
    assert vzb.can_request_stop(queue, vm)
    vzb.set_balloon_target(queue, vm, 0.5)
    vzb.get_balloon_info(queue, vm)
    rt.guest_ports.add(99)
    manager = vzb.VsockManager(vm, queue)
    manager.connect(99, timeout=2).close()
    with manager.listen(100) as listener:
        guest_connect(rt, vm, 100)
        listener.accept(timeout=2)[0].close()
    vzb.pause_vm(queue, vm).wait(2)
    assert vzb.can_resume(queue, vm)
    vzb.validate_save_restore_support(config)
    vzb.save_machine_state(queue, vm, root / "saved").wait(2)
    vzb.resume_vm(queue, vm).wait(2)
    vzb.request_stop_vm(queue, vm)
    rt.settle()
    vzb.start_vm(queue, vm).wait(2)
    vzb.stop_vm(queue, vm).wait(2)
    vm2 = vzb.create_vm(vzb.build_linux_vm_config(cfg), queue)
    vzb.restore_machine_state(queue, vm2, root / "saved").wait(2)
    vzb.run_run_loop_once()
    vzb.run_run_loop_aggressively(1)
    vzb.run_run_loop_until_done(lambda: True)
    vzb.nsdata_to_bytes(vzb.nsdata_from_bytes(b"x"))
    err = rt.nserror("VZErrorDomain", 1, "x", reason="y", underlying=[rt.nserror("D", 2, "z")])
    vzb.format_nserror_detailed(err)
    mac_scenario(root, rt)


def mac_scenario(root: Path, rt: FakeRuntime) -> None:
    """The macOS half: install from a restore image, boot the installed guest, explicit
    Mac inputs, an automounted share."""
    rt.knobs.install_step_s = 0.001
    ipsw = write_fake_ipsw(root / "restore.ipsw")
    mac = vzkit.MacVMConfig(
        vm_dir=root / "mac", volumes=(vzkit.VolumeMount(root / "share", "", False),)
    )
    vzb.install_macos(mac, ipsw, progress=lambda fraction: None, poll_s=0.001)
    config = vzb.build_macos_vm_config(mac.replace(keyboard="mac", pointer="trackpad"))
    vzb.validate_config(config)
    queue = vzb.Queue("mac")
    vm = vzb.create_vm(config, queue)
    vzb.start_vm(queue, vm).wait(2)
    vzb.stop_vm(queue, vm).wait(2)


@contextlib.contextmanager
def simulated(data: dict[str, Any] | None) -> Iterator[FakeRuntime]:
    saved = (platform.mac_ver, platform.machine)
    platform.mac_ver = lambda *a, **k: ("15.0", ("", "", ""), "arm64")  # type: ignore[assignment]
    platform.machine = lambda: "arm64"
    try:
        with installed(FakeRuntime(data=data, macos="15.0")) as rt:
            yield rt
    finally:
        platform.mac_ver, platform.machine = saved


def run(
    tmp: Path, data: dict[str, Any] | None, *, rewrite: Rewrite | None = None
) -> tuple[list[str], list[MethodSpec]]:
    with simulated(data) as rt:
        rt.rewrite = rewrite
        try:
            scenario(tmp, rt)
        except Exception:
            if not rt.violations:
                raise
        return list(rt.violations), list(rt.calls)


@pytest.fixture(scope="module")
def used(tmp_path_factory: pytest.TempPathFactory) -> list[MethodSpec]:
    violations, calls = run(tmp_path_factory.mktemp("baseline"), None)
    assert violations == []
    unique: dict[tuple[str, str, bool], MethodSpec] = {}
    for spec in calls:
        if spec.owner != "NSObject":
            unique.setdefault((spec.owner, spec.selector, spec.is_class), spec)
    return list(unique.values())


def _entry(data: dict[str, Any], spec: MethodSpec) -> dict[str, Any]:
    return data["classes"][spec.owner]  # type: ignore[no-any-return]


def _renamed(selector: str) -> str:
    head, sep, tail = selector.partition(":")
    return f"{head}Renamed{sep}{tail}"


def rename(spec: MethodSpec) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        if spec.owner in data["foundation_used"]:
            entry = data["foundation_used"][spec.owner]
            key = "class_methods" if spec.is_class else "instance_methods"
            entry[key] = [_renamed(s) if s == spec.selector else s for s in entry[key]]
            return
        entry = _entry(data, spec)
        if spec.prop is not None:
            accessor = "getter" if spec.role == "getter" else "setter"
            entry["properties"][spec.prop][accessor] = _renamed(spec.selector)
            return
        table = entry["class_methods" if spec.is_class else "instance_methods"]
        table[_renamed(spec.selector)] = table.pop(spec.selector)

    return mutate


def change_arity(spec: MethodSpec) -> Mutation:
    def mutate(data: dict[str, Any]) -> None:
        if spec.owner in data["foundation_used"]:
            entry = data["foundation_used"][spec.owner]
            key = "class_methods" if spec.is_class else "instance_methods"
            new = spec.selector + "extra:" if spec.selector.endswith(":") else spec.selector + ":"
            entry[key] = [new if s == spec.selector else s for s in entry[key]]
            return
        entry = _entry(data, spec)
        if spec.prop is not None:
            prop = entry["properties"][spec.prop]
            if spec.role == "setter":
                prop["readonly"] = True  # the setter disappears
            else:
                prop["available"] = "99.0"  # the getter is not there on this macOS
            return
        method = entry["class_methods" if spec.is_class else "instance_methods"][spec.selector]
        method["args"] = method["args"][:-1] if method["args"] else ["id"]

    return mutate


def test_every_used_selector_is_pinned(used: list[MethodSpec], tmp_path: Path) -> None:
    assert len(used) > 60  # the scenario really covers the adapter
    survivors = []
    for index, spec in enumerate(used):
        for kind, make in (("rename", rename), ("arity", change_arity)):
            if kind == "rename" and spec.selector == "init":
                continue  # -init is also NSObject's: renaming a re-declaration changes nothing
            data = load_raw()
            make(spec)(data)
            workdir = tmp_path / f"{index}-{kind}"
            workdir.mkdir()
            violations, _ = run(workdir, data)
            if not violations:
                survivors.append(f"{kind} {spec.owner} {spec.selector}")
    assert survivors == []


@pytest.mark.parametrize("name", DISPATCH_USED + CF_USED)
def test_dispatch_and_runloop_functions_are_pinned(name: str, tmp_path: Path) -> None:
    data = load_raw()
    if name in DISPATCH_USED:
        data["libdispatch_used"].remove(name)
    else:
        data["foundation_used"]["CFRunLoop"]["functions"].remove(name)
    violations, _ = run(tmp_path, data)
    assert any(name in v for v in violations)


def test_renaming_the_kernel_initializer(tmp_path: Path) -> None:
    data = load_raw()
    methods = data["classes"]["VZLinuxBootLoader"]["instance_methods"]
    methods["initWithKernelFileURL:"] = methods.pop("initWithKernelURL:")
    violations, _ = run(tmp_path, data)
    assert any("initWithKernelURL_" in v for v in violations)


def test_a_completion_block_with_another_signature(tmp_path: Path) -> None:
    data = load_raw()
    start = data["classes"]["VZVirtualMachine"]["instance_methods"]["startWithCompletionHandler:"]
    start["block_args"][0]["signature"] = "v@@"
    violations, _ = run(tmp_path, data)
    assert any("has signature 'v@@'" in v for v in violations)


def test_a_readonly_memory_size(tmp_path: Path) -> None:
    data = load_raw()
    data["classes"]["VZVirtualMachineConfiguration"]["properties"]["memorySize"]["readonly"] = True
    violations, _ = run(tmp_path, data)
    assert any("setMemorySize_" in v for v in violations)


def test_an_error_out_parameter_dropped(tmp_path: Path) -> None:
    data = load_raw()
    method = data["classes"]["VZVirtualMachineConfiguration"]["instance_methods"][
        "validateWithError:"
    ]
    method["error_out"] = False
    violations, _ = run(tmp_path, data)
    assert any("NSError**" in v for v in violations)


# -- the backend's calls, mutated: nil, wrong elements, plain Python objects (issue 19) ------


def _replacing(spec: MethodSpec, index: int, wrong: Callable[[Any], Any]) -> Rewrite:
    """Every ``spec`` message the backend sends gets ``wrong(its argument)`` at ``index``."""

    def rewrite(called: MethodSpec, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if called.key != spec.key or called.is_class != spec.is_class:
            return args
        return (*args[:index], wrong(args[index]), *args[index + 1 :])

    return rewrite


def _survivors(
    used: list[MethodSpec],
    tmp_path: Path,
    pick: Callable[[MethodSpec, int, str], bool],
    wrong: Callable[[Any], Any],
) -> tuple[int, list[str]]:
    """Run the scenario once per picked argument, mutated; list those nobody noticed."""
    tried, survivors = 0, []
    for n, spec in enumerate(used):
        for index, kind in enumerate(spec.args):
            if not pick(spec, index, kind):
                continue
            tried += 1
            workdir = tmp_path / f"{n}-{index}"
            workdir.mkdir()
            violations, _ = run(workdir, None, rewrite=_replacing(spec, index, wrong))
            where = f"{spec.selector}: argument {index} "
            if not any(where in v for v in violations):
                survivors.append(f"{spec.owner} {spec.selector} argument {index} ({kind})")
    return tried, survivors


def test_none_for_every_nonnull_argument_is_caught(used: list[MethodSpec], tmp_path: Path) -> None:
    def nonnull(spec: MethodSpec, index: int, kind: str) -> bool:
        return bool(spec.nulls) and spec.nulls[index] is False

    tried, survivors = _survivors(used, tmp_path, nonnull, lambda _: None)
    assert tried > 40  # URLs, blocks, queues, devices, strings, Foundation arguments
    assert survivors == []


def test_a_plain_python_object_for_every_pointer_argument_is_caught(
    used: list[MethodSpec], tmp_path: Path
) -> None:
    """Objects, strings, blocks, containers and the opaque ``dispatch_queue_t`` alike."""
    kinds: set[str] = set()

    def pointer(spec: MethodSpec, index: int, kind: str) -> bool:
        if spec.nulls and spec.nulls[index] is not None:
            kinds.add(kind)
            return True
        return False

    tried, survivors = _survivors(used, tmp_path, pointer, lambda _: object())
    assert "dispatch_queue_t" in kinds
    assert tried > 40
    assert survivors == []


def _with_a_stranger(value: Any) -> Any:
    """The container plus an element of another framework class (a MAC address)."""
    import Virtualization

    stranger = Virtualization.VZMACAddress.randomLocallyAdministeredAddress()
    if isinstance(value, dict):
        return {**value, "stranger": stranger}
    return [*value, stranger]


def test_a_wrong_element_type_in_every_container_is_caught(
    used: list[MethodSpec], tmp_path: Path
) -> None:
    kinds: set[str] = set()

    def container(spec: MethodSpec, index: int, kind: str) -> bool:
        if kind.startswith(("NSArray<", "NSDictionary<")):
            kinds.add(kind)
            return True
        return False

    tried, survivors = _survivors(used, tmp_path, container, _with_a_stranger)
    assert tried == len(kinds) > 10  # every device list of the configuration, and the shares
    assert "NSArray<VZStorageDeviceConfiguration>" in kinds
    assert "NSDictionary<NSString,VZSharedDirectory>" in kinds
    assert survivors == []


def test_the_vendored_data_is_the_shared_copy() -> None:
    data = load_raw()
    assert data["framework"] == "Virtualization"
    assert len(data["classes"]) == 131
    readme = Path(__file__).parents[1] / "data" / "apple-virtualization" / "README.md"
    import hashlib

    for name in ("api.json", "nullability.json"):
        digest = hashlib.sha256((readme.parent / name).read_bytes()).hexdigest()
        assert digest in readme.read_text()
    assert os.path.getsize(readme.parent / "api.json") > 100_000
    nulls = load_raw_nullability()
    assert set(nulls["classes"]) == set(data["classes"])
