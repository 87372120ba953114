"""The stand-in itself: it must refuse what PyObjC or the framework would refuse.

If these fail, the other contract tests prove nothing ("a fake that accepts anything").
"""

from __future__ import annotations

import gc
import threading
from pathlib import Path
from typing import Any

import pytest

import vzkit
from vzkit.backends import vz as vzb

from ._support import ARM64_IMAGE, FakeFactory, take_violations
from .fakeobjc import BadArgument, ContractViolation, FakeRuntime, UnknownSelector, load_raw
from .fakeobjc._foundation_api import SIGNATURES

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
    kernel.write_bytes(ARM64_IMAGE)
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
    kernel.write_bytes(ARM64_IMAGE)
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


# -- nullability, containers, opaque C types (issue 19) ----------------------------------------


def test_none_for_a_nonnull_argument(fake: FakeRuntime, tmp_path: Any) -> None:
    import Foundation
    import Virtualization as V

    url = Foundation.NSURL.fileURLWithPath_(str(tmp_path))
    loader = V.VZLinuxBootLoader.alloc()
    with pytest.raises(TypeError):  # BadArgument is a TypeError, as PyObjC's own refusals
        loader.initWithKernelURL_(None)
    assert take_violations(fake) == [
        "VZLinuxBootLoader -initWithKernelURL:: argument 0 (NSURL) is nonnull: "
        "None (nil) is not allowed"
    ]
    loader.initWithKernelURL_(url)
    directory = V.VZSharedDirectory.alloc()
    violates(fake, lambda: directory.initWithURL_readOnly_(None, True), r"argument 0 \(NSURL\)")
    device = V.VZVirtioNetworkDeviceConfiguration.alloc().init()
    violates(fake, lambda: device.setMACAddress_(None), r"-setMACAddress:: argument 0", BadArgument)
    config = V.VZVirtualMachineConfiguration.alloc().init()
    violates(fake, lambda: config.setStorageDevices_(None), "is nonnull")
    violates(fake, lambda: Foundation.NSURL.fileURLWithPath_(None), r"NSURL \+fileURLWithPath:")
    violates(fake, lambda: V.VZVirtioFileSystemDeviceConfiguration.validateTag_error_(None, None),
             "is nonnull")  # fmt: skip
    # Nullable in the headers: accepted.
    config.setBootLoader_(None)  # an unset boot loader is validateWithError:'s to report
    V.VZFileHandleSerialPortAttachment.alloc().initWithFileHandleForReading_fileHandleForWriting_(
        None, None
    )
    Foundation.NSError.errorWithDomain_code_userInfo_("D", 1, None)


def test_containers_hold_their_declared_element_types(fake: FakeRuntime, tmp_path: Any) -> None:
    import Foundation
    import Virtualization as V

    config = V.VZVirtualMachineConfiguration.alloc().init()
    nic = V.VZVirtioNetworkDeviceConfiguration.alloc().init()
    violates(fake, lambda: config.setStorageDevices_([nic]), "sequence of VZStorageDevice")
    violates(fake, lambda: config.setNetworkDevices_([nic, None]), "reach it as NSNull")
    config.setNetworkDevices_([nic])
    url = Foundation.NSURL.fileURLWithPath_(str(tmp_path))
    directory = V.VZSharedDirectory.alloc().initWithURL_readOnly_(url, False)
    share = V.VZMultipleDirectoryShare.alloc()
    violates(
        fake,
        lambda: share.initWithDirectories_({"a": url}),
        "a dict of NSString to VZSharedDirectory",
    )
    violates(fake, lambda: share.initWithDirectories_({1: directory}), "a dict of NSString")
    share.initWithDirectories_({"a": directory})
    violates(
        fake,
        lambda: Foundation.NSError.errorWithDomain_code_userInfo_("D", 1, {1: "x"}),
        r"argument 2 \(NSDictionary<NSString,id>\)",
    )


def test_opaque_c_types_take_only_their_fake(make_fake: FakeFactory, tmp_path: Any) -> None:
    rt = make_fake(macos="27.0")
    import Foundation
    import Virtualization as V

    config = V.VZVirtualMachineConfiguration.alloc().init()
    vm = V.VZVirtualMachine.alloc()
    violates(rt, lambda: vm.initWithConfiguration_queue_(config, object()), "dispatch_queue_t")
    attachment = V.VZVmnetNetworkDeviceAttachment.alloc()
    violates(rt, lambda: attachment.initWithNetwork_(object()), "must be a vmnet_network_ref")
    violates(
        rt,
        lambda: attachment.initWithNetwork_(rt.foreign("SecCertificateRef")),
        "must be a vmnet_network_ref",
    )
    violates(rt, lambda: attachment.initWithNetwork_(None), "is nonnull")
    attachment.initWithNetwork_(rt.foreign("vmnet_network_ref"))
    cert = V.VZEFISignatureX509Certificate.alloc()
    violates(rt, lambda: cert.initWithCertificate_(b"DER"), "must be a SecCertificateRef")
    cert.initWithCertificate_(rt.foreign("SecCertificateRef"))
    display = V.VZMacGraphicsDisplayConfiguration.alloc()
    violates(rt, lambda: display.initForScreen_sizeInPoints_(object(), (1, 2)), "NSScreen")
    violates(
        rt, lambda: display.initForScreen_sizeInPoints_(rt.foreign("NSScreen"), (1,)), "NSSize"
    )
    display.initForScreen_sizeInPoints_(rt.foreign("NSScreen"), (800, 600.0))
    violates(rt, lambda: Foundation.NSData.dataWithBytes_length_("x", 1), "bytes-like")


def test_nil_results_where_apple_returns_nil(fake: FakeRuntime) -> None:
    import Virtualization as V

    assert V.VZMACAddress.alloc().initWithString_("not-a-mac") is None
    assert V.VZMACAddress.alloc().initWithString_("02:00:00:0A:BB:01").string() == (
        "02:00:00:0a:bb:01"
    )
    # ... so the backend's own error for it is reachable now
    nat = vzkit.parse_network_mode("nat")
    with pytest.raises(vzkit.ConfigError, match="invalid MAC address 'not-a-mac'"):
        vzb.create_network_device(nat, mac_address="not-a-mac")
    assert V.VZMultipleDirectoryShare.canonicalizedNameFromName_("") is None


def test_a_nil_for_a_nonnull_result_is_the_stand_ins_bug(fake: FakeRuntime) -> None:
    import Virtualization as V

    device = V.VZVirtioNetworkDeviceConfiguration.alloc().init()
    assert device.MACAddress() is None  # the real one has a random address: the stand-in not
    assert any("stand-in bug" in v for v in take_violations(fake))


def test_every_foundation_selector_has_a_signature() -> None:
    """The hand-written Foundation signatures type exactly the selectors the data lists."""
    data = load_raw()
    listed = {
        (name, sign + sel)
        for name, entry in data["foundation_used"].items()
        if name != "CFRunLoop"
        for sign, key in (("+", "class_methods"), ("-", "instance_methods"))
        for sel in entry[key]
    }
    typed = {(name, sel) for name, table in SIGNATURES.items() for sel in table}
    assert typed == listed


def test_an_automounted_share_the_framework_cannot_name(fake: FakeRuntime) -> None:
    """``canonicalizedNameFromName:`` is nullable: the share of ``/`` (no name) still gets one."""
    devices = vzb.create_mac_shares([vzkit.VolumeMount(Path("/"), "", True)])
    share = devices[0].share()
    assert list(fake.prop(share, "directories")) == ["share"]
