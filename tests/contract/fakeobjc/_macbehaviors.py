"""The macOS-guest half of the simulated framework: restore images, the Mac platform, the
installer and its ``NSProgress``.

As with every behaviour, these run only after the call passed the API-data checks (selector,
arity, kinds, macOS version, arm64-only). A "restore image" is a file written by
:func:`write_fake_ipsw`; anything else fails to load as a real ``.ipsw`` that is not one would.
The installer runs on its own thread, advances its progress, honours ``-[NSProgress cancel]``,
writes a marker into the VM's disk and completes on the VM's queue.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._dispatch import current_queue

if TYPE_CHECKING:
    from ._runtime import FakeRuntime
    from ._spec import MethodSpec

VZ = "VZErrorDomain"
IPSW_MAGIC = b"FAKE-IPSW\n"
HWM_MAGIC = b"FAKEVZHWM"
MMID_MAGIC = b"FAKEVZMMID"
AUX_MAGIC = b"FAKE-AUX:"
ERR_CANCELLED = 9
ERR_RESTORE_IMAGE_LOAD = 10004
ERR_INVALID_RESTORE_IMAGE = 10005
ERR_INSTALL_FAILED = 10007
GIB = 1 << 30


def write_fake_ipsw(
    path: Path,
    *,
    build: str = "23E224",
    version: tuple[int, int, int] = (14, 4, 1),
    min_cpus: int = 2,
    min_memory_gb: int = 4,
    supported: bool = True,
    model_supported: bool = True,
    has_configuration: bool = True,
) -> Path:
    """A file the stand-in loads as a restore image with these properties."""
    meta = {
        "build": build,
        "version": list(version),
        "min_cpus": min_cpus,
        "min_memory": min_memory_gb * GIB,
        "supported": supported,
        "model_supported": model_supported,
        "has_configuration": has_configuration,
    }
    path.write_bytes(IPSW_MAGIC + json.dumps(meta).encode())
    return path


def _props(obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = obj._fk.props if obj is not None else {}
    return result


def _path(url: Any) -> str:
    return str(_props(url).get("path", ""))


def validate_mac(rt: FakeRuntime, config: Any) -> str | None:
    """Why a configuration with a macOS boot loader or Mac platform is invalid, or ``None``."""
    p = _props(config)
    loader, platform = p.get("bootLoader"), p.get("platform")
    is_mac_loader = type(loader).__name__ == "VZMacOSBootLoader"
    is_mac_platform = type(platform).__name__ == "VZMacPlatformConfiguration"
    if is_mac_loader != is_mac_platform:
        return "The macOS boot loader and the Mac platform must be used together."
    if not is_mac_loader:
        return None
    pp = _props(platform)
    for key in ("hardwareModel", "machineIdentifier", "auxiliaryStorage"):
        if pp.get(key) is None:
            return f"The Mac platform configuration has no {key}."
    if not _props(pp["hardwareModel"]).get("supported"):
        return "The hardware model is not supported on this host."
    if not os.path.isfile(_path(_props(pp["auxiliaryStorage"]).get("URL"))):
        return "The auxiliary storage was not found."
    for device in p.get("graphicsDevices", ()):
        if type(device).__name__ != "VZMacGraphicsDeviceConfiguration":
            return "A macOS guest needs a Mac graphics device."
    return None


class _Stopper:
    """Registered in ``rt.timers`` so the runtime's teardown stops an installer thread."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def cancel(self) -> None:
        self.event.set()


def register(rt: FakeRuntime) -> None:
    from ._behaviors import set_state, state_name

    b = rt.behaviors
    k = rt.knobs

    def on(cls: str, selector: str) -> Any:
        def deco(fn: Any) -> Any:
            b[(cls, selector)] = fn
            return fn

        return deco

    def data(raw: bytes) -> Any:
        return rt.make("NSData", bytes=raw)

    # -- restore images --------------------------------------------------------------------
    @on("VZMacOSRestoreImage", "loadFileURL:completionHandler:")
    def _load(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        url, handler = args
        what = "the completion handler of +[VZMacOSRestoreImage loadFileURL:completionHandler:]"

        def finish() -> None:
            try:
                raw = Path(_path(url)).read_bytes()
            except OSError as err:
                error = rt.nserror(VZ, ERR_RESTORE_IMAGE_LOAD, f"Failed to load: {err}")
                rt.call_python(handler, None, error, what=what)
                return
            if not raw.startswith(IPSW_MAGIC):
                error = rt.nserror(
                    VZ, ERR_INVALID_RESTORE_IMAGE, "The restore image is invalid.",
                    reason="The file is not a macOS restore image.",
                )  # fmt: skip
                rt.call_python(handler, None, error, what=what)
                return
            meta = json.loads(raw[len(IPSW_MAGIC) :])
            rt.call_python(handler, restore_image(url, meta), None, what=what)

        # Apple: the handler runs on an arbitrary queue, later.
        rt.global_queue().submit(finish, wait=False)

    def restore_image(url: Any, meta: dict[str, Any]) -> Any:
        flag = b"\x01" if meta["model_supported"] else b"\x00"
        model = rt.make(
            "VZMacHardwareModel",
            dataRepresentation=data(HWM_MAGIC + flag + secrets.token_bytes(15)),
            supported=bool(meta["model_supported"]) and k.mac_hardware_supported,
        )
        requirements = None
        if meta["has_configuration"]:
            requirements = rt.make(
                "VZMacOSConfigurationRequirements",
                hardwareModel=model,
                minimumSupportedCPUCount=meta["min_cpus"],
                minimumSupportedMemorySize=meta["min_memory"],
            )
        return rt.make(
            "VZMacOSRestoreImage",
            URL=url,
            buildVersion=meta["build"],
            operatingSystemVersion=tuple(meta["version"]),
            supported=bool(meta["supported"]),
            mostFeaturefulSupportedConfiguration=requirements,
        )

    @on("VZMacOSRestoreImage", "fetchLatestSupportedWithCompletionHandler:")
    def _latest(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        handler = args[0]
        what = (
            "the completion handler of "
            "+[VZMacOSRestoreImage fetchLatestSupportedWithCompletionHandler:]"
        )

        def finish() -> None:
            found = k.latest_restore_image
            if found is None:
                error = rt.nserror(
                    "NSURLErrorDomain", -1009, "The Internet connection appears to be offline."
                )
                rt.call_python(handler, None, error, what=what)
                return
            meta = {
                "build": found["build"],
                "version": list(found["version"]),
                "min_cpus": found["min_cpus"],
                "min_memory": found["min_memory_gb"] * GIB,
                "supported": True,
                "model_supported": True,
                "has_configuration": True,
            }
            url = rt.make("NSURL", path=found["url"], string=found["url"])
            rt.call_python(handler, restore_image(url, meta), None, what=what)

        rt.global_queue().submit(finish, wait=False)

    # -- the Mac platform ------------------------------------------------------------------
    @on("VZMacHardwareModel", "initWithDataRepresentation:")
    def _model(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        raw = _props(args[0]).get("bytes", b"")
        if not (raw.startswith(HWM_MAGIC) and len(raw) == len(HWM_MAGIC) + 16):
            return None
        rt.default_behavior(obj, spec, args)
        obj._fk.props["supported"] = raw[len(HWM_MAGIC)] == 1 and k.mac_hardware_supported
        return obj

    @on("VZMacMachineIdentifier", "init")
    def _mmid(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        rt.default_behavior(obj, spec, args)
        obj._fk.props["dataRepresentation"] = data(MMID_MAGIC + secrets.token_bytes(16))
        return obj

    @on("VZMacMachineIdentifier", "initWithDataRepresentation:")
    def _mmid_data(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        raw = _props(args[0]).get("bytes", b"")
        if not (raw.startswith(MMID_MAGIC) and len(raw) == len(MMID_MAGIC) + 16):
            return None
        return rt.default_behavior(obj, spec, args)

    @on("VZMacAuxiliaryStorage", "initCreatingStorageAtURL:hardwareModel:options:error:")
    def _aux(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        url, model, options = args[0], args[1], args[2]
        path = _path(url)
        if os.path.exists(path) and not options & 1:
            return (None, rt.nserror(VZ, 2, "The auxiliary storage already exists."))
        try:
            with open(path, "wb") as fh:
                fh.write(AUX_MAGIC + _props(_props(model)["dataRepresentation"])["bytes"])
        except OSError as err:
            return (None, rt.nserror("NSPOSIXErrorDomain", err.errno or 0, str(err)))
        obj._fk.initialized = True
        obj._fk.init_call = (spec.selector, args)
        obj._fk.props["URL"] = url
        return (obj, None)

    @on("VZMultipleDirectoryShare", "canonicalizedNameFromName:")
    def _canonical(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        # The header: nil "when it cannot produce a valid name". Which names those are is not
        # documented; here, a name with nothing left to canonicalize.
        name = str(args[0]).replace("/", ":").strip()
        return name if name.strip(".:") else None

    # -- the installer ---------------------------------------------------------------------
    @on("VZMacOSInstaller", "initWithVirtualMachine:restoreImageURL:")
    def _installer(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        vm = args[0]
        if current_queue() is not vm._fk.queue:
            raise rt.violation(
                "-[VZMacOSInstaller initWithVirtualMachine:restoreImageURL:] must run on the "
                "virtual machine's queue"
            )
        rt.default_behavior(obj, spec, args)
        obj._fk.queue = vm._fk.queue
        obj._fk.props["progress"] = rt.make(
            "NSProgress", total=100, completed=0, cancelled=False, finished=False
        )
        return obj

    @on("VZMacOSInstaller", "installWithCompletionHandler:")
    def _install(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        handler = args[0]
        vm = obj._fk.props["virtualMachine"]
        progress = obj._fk.props["progress"]
        q = vm._fk.queue
        what = "the completion handler of -[VZMacOSInstaller installWithCompletionHandler:]"
        if obj._fk.extra.get("started"):
            raise rt.violation("installWithCompletionHandler: called twice on one installer")
        obj._fk.extra["started"] = True
        if state_name(rt, vm) != "Stopped":
            err = rt.nserror(VZ, 3, "Invalid virtual machine state.")
            q.submit(lambda: rt.call_python(handler, err, what=what), wait=False)
            return
        failure = rt.take_failure(spec.selector)
        set_state(rt, vm, "Running")
        stopper = _Stopper()
        rt.timers.append(stopper)  # type: ignore[arg-type]
        disk = _disk_of(vm)
        build = _build_of(obj)

        def finish(error: Any) -> None:
            def block() -> None:
                set_state(rt, vm, "Stopped")
                progress._fk.props["finished"] = True
                rt.call_python(handler, error, what=what)

            if not stopper.event.is_set():
                q.submit(block, wait=False)

        def run() -> None:
            p = progress._fk.props
            while not stopper.event.wait(k.install_step_s):
                if p["cancelled"]:
                    finish(rt.nserror(VZ, ERR_CANCELLED, "The operation was cancelled."))
                    return
                if spec.selector in k.hang:
                    continue
                p["completed"] = min(100, p["completed"] + 100 // k.install_steps)
                if p["completed"] < 100:
                    continue
                if failure is not None:
                    finish(rt.nserror(failure["domain"], failure["code"], failure["description"]))
                    return
                if disk is not None:
                    with open(disk, "r+b") as fh:
                        fh.write(b"FAKE-MACOS:" + build.encode())
                finish(None)
                return

        threading.Thread(target=run, name="fake-macos-installer", daemon=True).start()

    # -- NSProgress ------------------------------------------------------------------------
    def prop(name: str) -> Any:
        return lambda rt, obj, spec, args: obj._fk.props[name]

    b[("NSProgress", "completedUnitCount")] = prop("completed")
    b[("NSProgress", "totalUnitCount")] = prop("total")
    b[("NSProgress", "isCancelled")] = prop("cancelled")
    b[("NSProgress", "isFinished")] = prop("finished")
    b[("NSProgress", "fractionCompleted")] = lambda rt, obj, spec, args: (
        obj._fk.props["completed"] / obj._fk.props["total"]
    )

    @on("NSProgress", "cancel")
    def _cancel(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        obj._fk.props["cancelled"] = True


def _disk_of(vm: Any) -> str | None:
    config = vm._fk.extra["config"]
    for device in _props(config).get("storageDevices", ()):
        attachment = _props(device).get("attachment")
        if attachment is not None:
            return _path(_props(attachment).get("URL"))
    return None


def _build_of(installer: Any) -> str:
    raw = Path(_path(installer._fk.props["restoreImageURL"])).read_bytes()
    meta = json.loads(raw[len(IPSW_MAGIC) :])
    return str(meta["build"])
