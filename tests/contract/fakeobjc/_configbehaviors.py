"""The simulated host's facts and the configuration objects: what a configuration built
from the API is checked against and what its objects do before any VM exists.

``validate`` is what ``validateWithError:`` (and ``-[VZVirtualMachine
initWithConfiguration:queue:]``) report for a configuration; the behaviours make machine
identifiers, EFI variable stores, disk and file attachments, MAC addresses and VirtioFS tags
behave as the framework documents them, nil results included (``VZMACAddress
initWithString:`` with a malformed address, an identifier from bytes that are not one).
"""

from __future__ import annotations

import os
import re
import secrets
from typing import TYPE_CHECKING, Any

from ._macbehaviors import validate_mac
from ._runtime import ObjCError

if TYPE_CHECKING:
    from ._runtime import FakeRuntime
    from ._spec import MethodSpec

VZ = "VZErrorDomain"
MIB = 1 << 20
ERR_INVALID_CONFIG = 2
MID_MAGIC = b"FAKEVZMID"
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}")
NBD = "VZNetworkBlockDeviceStorageDeviceAttachment"
#: What the framework's ``validateURL:error:`` takes here: the NBD URI schemes (TLS ones too).
NBD_URL_RE = re.compile(r"nbds?://[^/?#\s]+(/[^?#\s]*)?|nbds?\+unix:///[^?#\s]*\?socket=/\S+")


def props(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = obj._fk.props if obj is not None else {}
    return result


def path_of(url: Any) -> str:
    return str(props(url).get("path", ""))


# -- configuration validation ------------------------------------------------------------------


def validate(rt: FakeRuntime, config: Any) -> Any:
    """The NSError ``validateWithError:`` reports, or ``None``."""
    k = rt.knobs
    p = props(config)

    def invalid(reason: str) -> Any:
        return rt.nserror(
            VZ, ERR_INVALID_CONFIG, "Invalid virtual machine configuration.", reason=reason
        )

    if not k.entitled:
        return invalid(
            "The process doesn't have the 'com.apple.security.virtualization' entitlement."
        )
    cpus = p.get("CPUCount", 0)
    if not k.min_cpus <= cpus <= k.max_cpus:
        return invalid(f"The number of CPUs ({cpus}) is outside {k.min_cpus}..{k.max_cpus}.")
    memory = p.get("memorySize", 0)
    if not k.min_memory <= memory <= k.max_memory:
        return invalid(f"The memory size ({memory}) is outside the allowed range.")
    if memory % MIB:
        return invalid("The memory size must be a multiple of 1 MiB.")
    loader = p.get("bootLoader")
    if loader is None:
        return invalid("A boot loader is required.")
    kernel = path_of(props(loader).get("kernelURL"))
    if type(loader).__name__ == "VZLinuxBootLoader" and not os.path.isfile(kernel):
        return invalid("The kernel image was not found.")
    if type(loader).__name__ == "VZEFIBootLoader":
        store = props(loader).get("variableStore")
        if store is None or not os.path.isfile(path_of(props(store).get("URL"))):
            return invalid("The EFI variable store was not found.")
    platform = p.get("platform")
    nested = platform is not None and props(platform).get("nestedVirtualizationEnabled")
    if nested and not k.nested_supported:
        return invalid("Nested virtualization is not supported on this host.")
    for key in ("memoryBalloonDevices", "socketDevices"):
        if len(p.get(key, ())) > 1:
            return invalid(f"At most one device is allowed in {key}.")
    mac_problem = validate_mac(rt, config)
    if mac_problem is not None:
        return invalid(mac_problem)
    tags = [props(d).get("tag") for d in p.get("directorySharingDevices", ())]
    if len(tags) != len(set(tags)):
        return invalid("Directory sharing device tags must be unique.")
    for device in p.get("storageDevices", ()):
        attachment = props(device).get("attachment")
        if type(attachment).__name__ == NBD:
            continue  # a server: reached when the VM starts, not when it is validated
        if attachment is not None and not os.path.exists(path_of(props(attachment).get("URL"))):
            return invalid("A disk image was not found.")
    return None


def register(rt: FakeRuntime) -> None:
    b = rt.behaviors
    k = rt.knobs

    def on(cls: str, selector: str) -> Any:
        def deco(fn: Any) -> Any:
            b[(cls, selector)] = fn
            return fn

        return deco

    def default(obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return rt.default_behavior(obj, spec, args)

    # -- host facts ------------------------------------------------------------------------
    b[("VZVirtualMachine", "isSupported")] = lambda rt, c, s, a: k.vm_supported
    b[("VZVirtualMachineConfiguration", "minimumAllowedMemorySize")] = lambda *a: k.min_memory
    b[("VZVirtualMachineConfiguration", "maximumAllowedMemorySize")] = lambda *a: k.max_memory
    b[("VZVirtualMachineConfiguration", "minimumAllowedCPUCount")] = lambda *a: k.min_cpus
    b[("VZVirtualMachineConfiguration", "maximumAllowedCPUCount")] = lambda *a: k.max_cpus
    b[("VZGenericPlatformConfiguration", "isNestedVirtualizationSupported")] = lambda *a: (
        k.nested_supported
    )
    b[("VZVirtioFileSystemDeviceConfiguration", "macOSGuestAutomountTag")] = lambda *a: (
        "com.apple.virtio-fs.automount"
    )

    b[("VZLinuxRosettaDirectoryShare", "availability")] = lambda *a: k.rosetta

    @on("VZLinuxRosettaDirectoryShare", "initWithError:")
    def _rosetta(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if k.rosetta != 2:
            return (None, rt.nserror(VZ, 10, "Rosetta is not installed on this Mac."))
        return default(obj, spec, args)

    @on("VZLinuxRosettaDirectoryShare", "installRosettaWithCompletionHandler:")
    def _install(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        handler = args[0]

        def finish() -> None:  # on a queue of the framework's own, later
            error = None
            if k.rosetta == 0:
                error = rt.nserror(VZ, 10, "Rosetta is not supported on this Mac.")
            elif not k.rosetta_install_ok:
                error = rt.nserror(VZ, 9, "The Rosetta installation was cancelled.")
            else:
                k.rosetta = 2
            rt.call_python(handler, error, what="the Rosetta install's completion handler")

        rt.global_queue().submit(finish, wait=False)
        return None

    @on("VZBridgedNetworkInterface", "networkInterfaces")
    def _ifaces(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return tuple(
            rt.make(
                "VZBridgedNetworkInterface",
                identifier=name,
                localizedDisplayName=f"Ethernet ({name})",
            )
            for name in k.bridge_interfaces
        )

    # -- configuration objects ---------------------------------------------------------------
    @on("VZVirtualMachineConfiguration", "validateWithError:")
    def _validate(rt: FakeRuntime, cfg: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        failure = rt.take_failure(spec.selector)
        if failure is not None:
            err = rt.nserror(
                failure["domain"], failure["code"], failure["description"], reason=failure["reason"]
            )
            return (False, err)
        err = validate(rt, cfg)
        return (err is None, err)

    @on("VZVirtualMachineConfiguration", "validateSaveRestoreSupportWithError:")
    def _validate_sr(rt: FakeRuntime, cfg: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if rt.take_failure(spec.selector) is not None or not k.save_restore_supported:
            return (
                False,
                rt.nserror(VZ, 10, "Save/restore is not supported for this configuration."),
            )
        return (True, None)

    @on("VZGenericMachineIdentifier", "init")
    def _mid(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        default(obj, spec, args)
        data = rt.make("NSData", bytes=MID_MAGIC + secrets.token_bytes(16))
        obj._fk.props["dataRepresentation"] = data
        return obj

    @on("VZGenericMachineIdentifier", "initWithDataRepresentation:")
    def _mid_data(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        raw = props(args[0]).get("bytes", b"")
        if not (raw.startswith(MID_MAGIC) and len(raw) == len(MID_MAGIC) + 16):
            return None  # ObjC nil: not a machine identifier
        default(obj, spec, args)
        return obj

    @on("VZEFIVariableStore", "initCreatingVariableStoreAtURL:options:error:")
    def _nvram(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        path, options = path_of(args[0]), args[1]
        if os.path.exists(path) and not options & 1:
            return (None, rt.nserror(VZ, 2, "The EFI variable store already exists."))
        try:
            with open(path, "wb") as fh:
                fh.write(b"FAKE-EFI-NVRAM")
        except OSError as err:
            return (None, rt.nserror("NSPOSIXErrorDomain", err.errno or 0, str(err)))
        obj._fk.initialized = True
        obj._fk.init_call = (spec.selector, args)
        obj._fk.props["URL"] = args[0]
        return (obj, None)

    def disk_init(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if not os.path.isfile(path_of(args[0])):
            return (None, rt.nserror("NSCocoaErrorDomain", 260, "The file doesn't exist."))
        return default(obj, spec, args)

    b[("VZDiskImageStorageDeviceAttachment", "initWithURL:readOnly:error:")] = disk_init
    b[
        (
            "VZDiskImageStorageDeviceAttachment",
            "initWithURL:readOnly:cachingMode:synchronizationMode:error:",
        )
    ] = disk_init

    def nbd_url_ok(url: Any) -> bool:
        return NBD_URL_RE.fullmatch(str(props(url).get("string", ""))) is not None

    @on(NBD, "validateURL:error:")
    def _nbd_validate(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if nbd_url_ok(args[0]):
            return (True, None)
        return (False, rt.nserror(VZ, 2, "The URL is not a valid network block device URL."))

    @on(NBD, "initWithURL:timeout:forcedReadOnly:synchronizationMode:error:")
    def _nbd_init(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        failure = rt.take_failure(spec.selector)
        if failure is not None:
            return (None, rt.nserror(failure["domain"], failure["code"], failure["description"]))
        if not nbd_url_ok(args[0]):
            return (None, rt.nserror(VZ, 2, "The URL is not a valid network block device URL."))
        return default(obj, spec, args)

    @on("VZFileSerialPortAttachment", "initWithURL:append:error:")
    def _file_serial(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        try:
            with open(path_of(args[0]), "ab" if args[1] else "wb"):
                pass
        except OSError as err:
            return (None, rt.nserror("NSPOSIXErrorDomain", err.errno or 0, str(err)))
        return default(obj, spec, args)

    @on("VZMACAddress", "randomLocallyAdministeredAddress")
    def _mac(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        octets = bytearray(secrets.token_bytes(6))
        octets[0] = (octets[0] & 0xFC) | 0x02
        return rt.make("VZMACAddress", string=":".join(f"{o:02x}" for o in octets))

    @on("VZMACAddress", "initWithString:")
    def _mac_string(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        # VZMACAddress.h: six bytes in hexadecimal, colon separated, either case; nil if
        # the string is not formatted so. -string is lower case.
        if MAC_RE.fullmatch(args[0]) is None:
            return None
        default(obj, spec, args)
        obj._fk.props["string"] = args[0].lower()
        return obj

    @on("VZMACAddress", "isLocallyAdministeredAddress")
    def _mac_local(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return bool(int(props(obj)["string"][:2], 16) & 0x02)

    def tag_ok(tag: str) -> bool:
        return bool(tag) and len(tag.encode()) <= 36

    @on("VZVirtioFileSystemDeviceConfiguration", "initWithTag:")
    def _fs_tag(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if not tag_ok(args[0]):
            raise ObjCError(f"NSInvalidArgumentException: invalid tag {args[0]!r}")
        return default(obj, spec, args)

    @on("VZVirtioFileSystemDeviceConfiguration", "validateTag:error:")
    def _fs_validate(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if tag_ok(args[0]):
            return (True, None)
        return (False, rt.nserror(VZ, 2, f"Invalid tag {args[0]!r}."))
