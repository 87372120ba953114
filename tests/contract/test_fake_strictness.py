"""The stand-in itself: it must refuse what PyObjC or the framework would refuse.

If these fail, the other contract tests prove nothing ("a fake that accepts anything").
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest

from ._support import FakeFactory, take_violations
from .fakeobjc import ContractViolation, FakeRuntime, UnknownSelector

pytestmark = pytest.mark.contract


def violates(
    rt: FakeRuntime, fn: Any, match: str, exc: type[BaseException] = ContractViolation
) -> None:
    with pytest.raises(exc, match=match):
        fn()
    found = take_violations(rt)
    assert found, "the violation was not recorded"


def test_unknown_selectors_classes_and_functions(fake: FakeRuntime) -> None:
    import dispatch
    import Foundation
    import Virtualization as V

    config = V.VZVirtualMachineConfiguration.alloc().init()
    violates(
        fake,
        lambda: config.setCpuCount_(2),
        r"no instance selector 'setCpuCount_'",
        UnknownSelector,
    )
    violates(fake, lambda: V.VZNoSuchThing, "does not exist", AttributeError)
    violates(fake, lambda: V.VZMACAddress.randomAddress(), "no class selector", AttributeError)
    violates(fake, lambda: Foundation.NSString, "does not exist", AttributeError)
    violates(fake, lambda: dispatch.dispatch_apply, "does not exist", AttributeError)
    violates(fake, lambda: Foundation.NSURL.URLWithPath_("/x"), "no class selector", AttributeError)


def test_arity_and_kinds(fake: FakeRuntime) -> None:
    import Foundation
    import Virtualization as V

    config = V.VZVirtualMachineConfiguration.alloc().init()
    violates(fake, lambda: config.setCPUCount_(), r"takes 1 argument\(s\) \(NSUInteger\), got 0")
    violates(fake, lambda: config.setCPUCount_(1, 2), "got 2")
    violates(fake, lambda: config.setCPUCount_(-1), r"within 0\.\.")
    violates(fake, lambda: config.setCPUCount_("2"), "must be an int")
    violates(fake, lambda: config.setCPUCount_(cpus=2), "no keyword arguments")
    violates(
        fake,
        lambda: config.setStorageDevices_([object()]),
        "sequence of VZStorageDeviceConfiguration",
    )
    violates(fake, lambda: config.setBootLoader_(config), "must be a VZBootLoader")
    url = Foundation.NSURL.fileURLWithPath_("/tmp")
    violates(
        fake, lambda: V.VZSharedDirectory.alloc().initWithURL_readOnly_(url, 1), "must be a bool"
    )
    violates(fake, lambda: Foundation.NSURL.fileURLWithPath_(b"/tmp"), "must be a str")
    attachment = V.VZDiskImageStorageDeviceAttachment.alloc()
    violates(
        fake,
        lambda: attachment.initWithURL_readOnly_cachingMode_synchronizationMode_error_(
            url, False, 7, 1, None
        ),
        "must be one of",
    )


def test_error_out_parameters(fake: FakeRuntime) -> None:
    import Virtualization as V

    config = V.VZVirtualMachineConfiguration.alloc().init()
    violates(
        fake, lambda: config.validateWithError_(object()), r"None \(PyObjC returns the NSError"
    )
    ok, error = config.validateWithError_(None)
    assert ok is False
    assert error is not None


def test_readonly_properties_have_no_setter(fake: FakeRuntime) -> None:
    import Foundation
    import Virtualization as V

    url = Foundation.NSURL.fileURLWithPath_("/tmp")
    directory = V.VZSharedDirectory.alloc().initWithURL_readOnly_(url, True)
    violates(fake, lambda: directory.setReadOnly_(False), "no instance selector", AttributeError)
    assert directory.isReadOnly() is True
    violates(
        fake,
        lambda: V.VZVirtualMachineConfiguration.setMinimumAllowedCPUCount_(1),
        "no class selector",
        AttributeError,
    )


def test_unavailable_initialisers_and_uninitialised_objects(fake: FakeRuntime) -> None:
    import Virtualization as V

    violates(fake, lambda: V.VZLinuxBootLoader.alloc().init(), "-init is NS_UNAVAILABLE")
    violates(fake, lambda: V.VZVirtioSocketDevice.new(), r"\+new is NS_UNAVAILABLE")
    violates(fake, lambda: V.VZStorageDeviceConfiguration.alloc().init(), "NS_UNAVAILABLE")
    raw = V.VZVirtioNetworkDeviceConfiguration.alloc()
    violates(fake, lambda: raw.setMACAddress_(None), "uninitialised object")
    platform = V.VZGenericPlatformConfiguration.alloc().init()
    violates(fake, lambda: platform.init(), "already initialised")
    V.VZVirtioSocketListener.alloc().init()  # NSObject's -init: fine
    violates(fake, lambda: V.VZNATNetworkDeviceAttachment(), "called directly")
    violates(fake, lambda: setattr(platform, "extra", 1), "cannot set Python attribute")


def test_availability_and_architecture(make_fake: FakeFactory) -> None:
    rt = make_fake(macos="12.0", arch="x86_64")
    import Virtualization as V

    violates(
        rt, lambda: V.VZEFIBootLoader, r"macOS 13\.0\+ \(simulated macOS 12\.0\)", AttributeError
    )
    violates(rt, lambda: V.VZMacPlatformConfiguration, "arm64-only", AttributeError)
    platform = V.VZGenericPlatformConfiguration.alloc().init()
    violates(rt, lambda: platform.machineIdentifier(), r"macOS 13\.0\+", AttributeError)
    config = V.VZVirtualMachineConfiguration.alloc().init()
    violates(
        rt, lambda: config.validateSaveRestoreSupportWithError_(None), "macOS 14.0+", AttributeError
    )
    rt13 = make_fake(macos="13.0")
    import Foundation
    import Virtualization as V13

    Foundation.NSURL.fileURLWithPath_("/tmp")
    attachment = V13.VZDiskImageStorageDeviceAttachment.alloc()
    violates(  # an enum case newer than the host: VZDiskSynchronizationMode is 14.0
        rt13,
        lambda: V13.VZDiskBlockDeviceStorageDeviceAttachment,
        r"macOS 14\.0\+",
        AttributeError,
    )
    assert attachment is not None


def test_blocks_must_match_their_signature(fake: FakeRuntime, tmp_path: Any) -> None:
    import Foundation
    import Virtualization as V

    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = V.VZVirtualMachineConfiguration.alloc().init()
    config.setCPUCount_(1)
    config.setMemorySize_(256 << 20)
    config.setBootLoader_(
        V.VZLinuxBootLoader.alloc().initWithKernelURL_(
            Foundation.NSURL.fileURLWithPath_(str(kernel))
        )
    )
    import dispatch

    q = dispatch.dispatch_queue_create(b"t", None)
    vm = V.VZVirtualMachine.alloc().initWithConfiguration_queue_(config, q)
    violates(
        fake,
        lambda: fake.run_on(q, lambda: vm.startWithCompletionHandler_(lambda: None)),
        r"signature 'v@'",
    )
    violates(fake, lambda: fake.run_on(q, lambda: vm.startWithCompletionHandler_(42)), "callable")
    violates(
        fake,
        lambda: fake.run_on(q, lambda: vm.startWithCompletionHandler_(None)),
        r"argument 0 \(block\) is nonnull",
    )
    violates(fake, lambda: vm.startWithCompletionHandler_(lambda err: None), "off the VM's queue")
    violates(fake, lambda: vm.state(), "off the VM's queue")
    done = threading.Event()
    fake.run_on(q, lambda: vm.startWithCompletionHandler_(lambda err: done.set()))
    assert done.wait(5)


def test_exceptions_must_not_cross_into_objc(fake: FakeRuntime, tmp_path: Any) -> None:
    import dispatch

    q = dispatch.dispatch_queue_create(b"t", None)

    def bad() -> None:
        raise RuntimeError("escaped")

    dispatch.dispatch_async(q, bad)
    fake.settle()
    assert any("escaped" in v for v in take_violations(fake))
    violates(
        fake, lambda: fake.run_on(q, lambda: dispatch.dispatch_sync(q, lambda: None)), "deadlock"
    )
    violates(fake, lambda: dispatch.dispatch_queue_create("label", None), "label must be bytes")
    violates(fake, lambda: dispatch.dispatch_main(), "never returns")


def test_weak_delegates_must_be_kept_alive(fake: FakeRuntime, tmp_path: Any) -> None:
    import Foundation
    import objc
    import Virtualization as V

    class Delegate(Foundation.NSObject):
        def guestDidStopVirtualMachine_(self, vm: Any) -> None:
            pass

    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    config = V.VZVirtualMachineConfiguration.alloc().init()
    config.setCPUCount_(1)
    config.setMemorySize_(256 << 20)
    config.setBootLoader_(
        V.VZLinuxBootLoader.alloc().initWithKernelURL_(
            Foundation.NSURL.fileURLWithPath_(str(kernel))
        )
    )
    q = __import__("dispatch").dispatch_queue_create(b"t", None)
    vm = V.VZVirtualMachine.alloc().initWithConfiguration_queue_(config, q)
    fake.run_on(q, lambda: vm.setDelegate_(Delegate.alloc().init()))  # nobody keeps it
    gc.collect()
    from .fakeobjc import guest_power_off

    guest_power_off(fake, vm)
    fake.settle()
    assert any("delegate was deallocated" in v for v in take_violations(fake))

    with pytest.raises(ContractViolation, match="BadPrototypeError"):

        class Wrong(Foundation.NSObject):
            def guestDidStopVirtualMachine_(self) -> None:
                pass

    take_violations(fake)

    class Helper(Foundation.NSObject):
        @objc.python_method
        def helper_with_underscores(self) -> int:
            return 1

    assert Helper.alloc().init().helper_with_underscores() == 1
