"""What the simulated Virtualization framework *does* once a call passed the contract checks.

Behaviours are looked up only after the selector, arity, kinds, availability and queue were
checked against the API data, so they cannot widen the API: a behaviour for a selector the
data lacks is never reached. The ``VZVirtualMachine`` here is a state machine that moves
through ``VZVirtualMachineState`` and calls completion handlers asynchronously on the VM's
queue; tests can inject ``NSError`` failures (``FakeRuntime.fail_next``), hang an operation,
power the guest off, crash the VM, or connect from the "guest" over vsock.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from typing import TYPE_CHECKING, Any

from ._configbehaviors import MIB, VZ, path_of, props, validate
from ._configbehaviors import register as register_config
from ._macbehaviors import register as register_mac
from ._runtime import ObjCError, declares_protocol, weak

if TYPE_CHECKING:
    from ._runtime import FakeRuntime
    from ._spec import MethodSpec

STATE_NAMES = (
    "Stopped",
    "Running",
    "Paused",
    "Error",
    "Starting",
    "Pausing",
    "Resuming",
    "Stopping",
    "Saving",
    "Restoring",
)
ERR_INVALID_STATE = 3
ERR_INVALID_TRANSITION = 4
ERR_SAVE = 11
ERR_RESTORE = 12
ECONNRESET = 54


def state_value(rt: FakeRuntime, name: str) -> int:
    return int(rt.api.enums["VZVirtualMachineState"][f"VZVirtualMachineState{name}"])


def state_name(rt: FakeRuntime, vm: Any) -> str:
    value = vm._fk.extra["state"]
    for name in STATE_NAMES:
        if state_value(rt, name) == value:
            return name
    raise AssertionError(f"unknown VM state {value}")


def set_state(rt: FakeRuntime, vm: Any, name: str) -> None:
    vm._fk.extra["state"] = state_value(rt, name)
    vm._fk.extra.setdefault("history", []).append(name)


def fingerprint(config: Any) -> str:
    """What a saved machine state is tied to: the configuration, share paths included."""
    p = props(config)
    loader = p.get("bootLoader")
    platform = props(p.get("platform"))
    mid = props(platform.get("machineIdentifier"))
    shares = []
    for dev in p.get("directorySharingDevices", ()):
        share = props(props(dev).get("share"))
        directory = props(share.get("directory"))
        shares.append(
            (props(dev).get("tag"), path_of(directory.get("URL")), directory.get("readOnly"))
        )
    disks = [
        path_of(props(props(d).get("attachment")).get("URL")) for d in p.get("storageDevices", ())
    ]
    data = props(mid.get("dataRepresentation")).get("bytes", b"")
    return json.dumps(
        {
            "cpus": p.get("CPUCount"),
            "memory": p.get("memorySize"),
            "loader": type(loader).__name__,
            "machine": data.hex(),
            "shares": shares,
            "disks": disks,
            "net": len(p.get("networkDevices", ())),
        },
        sort_keys=True,
    )


# -- the VM state machine ----------------------------------------------------------------------


def notify(rt: FakeRuntime, vm: Any, method: str, *args: Any) -> None:
    """Call an (optional) delegate method, as the framework does, on the VM's queue."""
    ref = vm._fk.extra.get("delegate")
    if ref is None:
        return
    delegate = ref()
    if delegate is None:
        rt.violation(
            "the VZVirtualMachine's delegate was deallocated while the VM could still call it "
            "(the framework holds delegates weakly: keep a strong reference)"
        )
        return
    fn = _find(type(delegate), method)
    if fn is not None:
        rt.call_python(fn, delegate, *args, what=f"the delegate method {method}")


def _find(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return None


def transition(
    rt: FakeRuntime,
    vm: Any,
    selector: str,
    handler: Any,
    allowed: tuple[str, ...],
    during: str,
    after: str,
    work: Any = None,
) -> None:
    q = vm._fk.queue
    before = state_name(rt, vm)
    what = f"the completion handler of -[VZVirtualMachine {selector}]"
    if before not in allowed:
        err = rt.nserror(
            VZ,
            ERR_INVALID_TRANSITION,
            "Invalid virtual machine state transition.",
            reason=f"The virtual machine is {before.lower()}.",
        )
        q.submit(lambda: rt.call_python(handler, err, what=what), wait=False)
        return
    failure = rt.take_failure(selector)
    set_state(rt, vm, during)

    def finish() -> None:
        error = None
        state_after = after
        if failure is not None:
            state_after = failure["state_after"] or before
            error = rt.nserror(
                failure["domain"], failure["code"], failure["description"], reason=failure["reason"]
            )
        elif work is not None:
            problem = work()
            if problem is not None:
                state_after, error = problem
        set_state(rt, vm, state_after)
        rt.call_python(handler, error, what=what)

    if selector in rt.knobs.hang:
        return
    if rt.knobs.op_delay:
        timer = threading.Timer(rt.knobs.op_delay, lambda: q.submit(finish, wait=False))
        timer.daemon = True
        rt.timers.append(timer)
        timer.start()
    else:
        q.submit(finish, wait=False)


def guest_power_off(rt: FakeRuntime, vm: Any) -> None:
    """The guest shuts down: the VM stops and the delegate hears ``guestDidStopVirtualMachine:``."""

    def block() -> None:
        set_state(rt, vm, "Stopped")
        notify(rt, vm, "guestDidStopVirtualMachine_", vm)

    vm._fk.queue.submit(block, wait=False)


def vm_crash(rt: FakeRuntime, vm: Any, description: str = "The virtual machine crashed.") -> None:
    """The VM fails: state error and ``virtualMachine:didStopWithError:``."""

    def block() -> None:
        set_state(rt, vm, "Error")
        notify(rt, vm, "virtualMachine_didStopWithError_", vm, rt.nserror(VZ, 1, description))

    vm._fk.queue.submit(block, wait=False)


def guest_connect(rt: FakeRuntime, vm: Any, port: int) -> socket.socket | None:
    """The guest connects to host ``port``; returns the guest's end, or ``None`` if refused."""
    devices = vm._fk.extra["socket_devices"]
    if not devices:
        return None
    device = devices[0]
    listener = device._fk.extra["listeners"].get(port)
    if listener is None:
        return None
    host_end, guest_end = socket.socketpair()
    rt.guest_sockets.append(guest_end)
    held = [
        rt.make(
            "VZVirtioSocketConnection",
            destinationPort=port,
            sourcePort=1024 + secrets.randbelow(60000),
        )
    ]
    held[0]._fk.extra["fd"] = host_end.detach()
    accepted: list[bool] = []

    def block() -> None:
        ref = listener._fk.extra.get("delegate")
        delegate = ref() if ref is not None else None
        if delegate is None:
            rt.violation(
                "the VZVirtioSocketListener's delegate is gone (held weakly: keep it alive)"
            )
            return
        fn = _find(type(delegate), "listener_shouldAcceptNewConnection_fromSocketDevice_")
        if fn is None:
            rt.violation("the listener delegate lacks listener:shouldAcceptNewConnection:...")
            return
        result = rt.call_python(
            fn, delegate, listener, held[0], device, what="listener:shouldAcceptNewConnection:"
        )
        if not declares_protocol(type(delegate), "VZVirtioSocketListenerDelegate"):
            # PyObjC types a method from the protocols its class declares (or metadata that
            # happens to be loaded): undeclared, it returns an object, and the framework
            # reads a pointer's low byte as the BOOL.
            rt.violation(
                f"{type(delegate).__name__} does not declare VZVirtioSocketListenerDelegate "
                "(protocols=[objc.protocolNamed(...)]): PyObjC cannot type "
                "listener:shouldAcceptNewConnection:fromSocketDevice: as returning BOOL"
            )
            return
        if not isinstance(result, bool):
            rt.violation(f"listener:shouldAcceptNewConnection: must return a bool, got {result!r}")
            return
        accepted.append(result)

    vm._fk.queue.submit(block, wait=True)
    if not accepted or not accepted[0]:
        close_connection(held[0])
    held.clear()  # the framework's reference goes away: an un-dup'ed fd would close now
    return guest_end


def close_connection(conn: Any) -> None:
    fd = conn._fk.extra.get("fd", -1)
    conn._fk.extra["fd"] = -1
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def register(rt: FakeRuntime) -> None:
    b = rt.behaviors
    k = rt.knobs

    def on(cls: str, selector: str) -> Any:
        def deco(fn: Any) -> Any:
            b[(cls, selector)] = fn
            return fn

        return deco

    # -- the virtual machine ---------------------------------------------------------------
    def vm_init(rt: FakeRuntime, vm: Any, spec: MethodSpec, args: tuple[Any, ...], q: Any) -> Any:
        config = args[0]
        err = validate(rt, config)
        if err is not None:
            info = err._fk.props["userInfo"]
            raise ObjCError(f"NSInvalidArgumentException: invalid configuration ({info})")
        vm._fk.initialized = True
        vm._fk.init_call = (spec.selector, args)
        vm._fk.queue = q
        extra = vm._fk.extra
        extra["config"] = config
        set_state(rt, vm, "Stopped")
        cp = props(config)
        extra["socket_devices"] = []
        for _ in cp.get("socketDevices", ()):
            device = rt.make("VZVirtioSocketDevice")
            device._fk.queue = q
            device._fk.extra["listeners"] = {}
            device._fk.extra["vm"] = weak(vm)
            extra["socket_devices"].append(device)
        extra["balloons"] = []
        for _ in cp.get("memoryBalloonDevices", ()):
            balloon = rt.make(
                "VZVirtioTraditionalMemoryBalloonDevice",
                targetVirtualMachineMemorySize=cp.get("memorySize", 0),
            )
            balloon._fk.queue = q
            balloon._fk.extra["memory"] = cp.get("memorySize", 0)
            extra["balloons"].append(balloon)
        rt.vms.append(vm)
        return vm

    b[("VZVirtualMachine", "initWithConfiguration:queue:")] = lambda rt, vm, s, a: vm_init(
        rt, vm, s, a, a[1]
    )
    b[("VZVirtualMachine", "initWithConfiguration:")] = lambda rt, vm, s, a: vm_init(
        rt, vm, s, a, rt.main_queue
    )

    def in_state(*names: str) -> Any:
        return lambda rt, vm, spec, args: state_name(rt, vm) in names

    b[("VZVirtualMachine", "state")] = lambda rt, vm, s, a: vm._fk.extra["state"]
    b[("VZVirtualMachine", "canStart")] = in_state("Stopped", "Error")
    b[("VZVirtualMachine", "canStop")] = in_state("Running", "Paused", "Error")
    b[("VZVirtualMachine", "canPause")] = in_state("Running")
    b[("VZVirtualMachine", "canResume")] = in_state("Paused")
    b[("VZVirtualMachine", "canRequestStop")] = in_state("Running")
    b[("VZVirtualMachine", "queue")] = lambda rt, vm, s, a: vm._fk.queue
    b[("VZVirtualMachine", "socketDevices")] = lambda rt, vm, s, a: tuple(
        vm._fk.extra["socket_devices"]
    )
    b[("VZVirtualMachine", "memoryBalloonDevices")] = lambda rt, vm, s, a: tuple(
        vm._fk.extra["balloons"]
    )

    @on("VZVirtualMachine", "setDelegate:")
    def _set_delegate(rt: FakeRuntime, vm: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        vm._fk.extra["delegate"] = weak(args[0])

    b[("VZVirtualMachine", "delegate")] = lambda rt, vm, s, a: (
        vm._fk.extra.get("delegate") or (lambda: None)
    )()

    b[("VZVirtualMachine", "startWithCompletionHandler:")] = lambda rt, vm, s, a: transition(
        rt, vm, "startWithCompletionHandler:", a[0], ("Stopped", "Error"), "Starting", "Running"
    )
    b[("VZVirtualMachine", "startWithOptions:completionHandler:")] = lambda rt, vm, s, a: (
        transition(rt, vm, s.selector, a[1], ("Stopped", "Error"), "Starting", "Running")
    )
    b[("VZVirtualMachine", "pauseWithCompletionHandler:")] = lambda rt, vm, s, a: transition(
        rt, vm, s.selector, a[0], ("Running",), "Pausing", "Paused"
    )
    b[("VZVirtualMachine", "resumeWithCompletionHandler:")] = lambda rt, vm, s, a: transition(
        rt, vm, s.selector, a[0], ("Paused",), "Resuming", "Running"
    )
    b[("VZVirtualMachine", "stopWithCompletionHandler:")] = lambda rt, vm, s, a: transition(
        rt,
        vm,
        s.selector,
        a[0],
        ("Running", "Paused", "Error", "Starting", "Pausing", "Resuming"),
        "Stopping",
        "Stopped",
    )

    @on("VZVirtualMachine", "requestStopWithError:")
    def _request_stop(rt: FakeRuntime, vm: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        failure = rt.take_failure(spec.selector)
        if failure is not None:
            return (False, rt.nserror(failure["domain"], failure["code"], failure["description"]))
        if state_name(rt, vm) != "Running":
            return (False, rt.nserror(VZ, ERR_INVALID_TRANSITION, "Invalid state transition."))
        if k.guest_honours_request_stop:
            guest_power_off(rt, vm)
        return (True, None)

    @on("VZVirtualMachine", "saveMachineStateToURL:completionHandler:")
    def _save(rt: FakeRuntime, vm: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        url, handler = args

        def work() -> Any:
            try:
                with open(path_of(url), "w", encoding="utf-8") as fh:
                    fh.write(fingerprint(vm._fk.extra["config"]))
            except OSError as err:
                return ("Paused", rt.nserror(VZ, ERR_SAVE, f"Failed to save: {err}"))
            return None

        transition(rt, vm, spec.selector, handler, ("Paused",), "Saving", "Paused", work)

    @on("VZVirtualMachine", "restoreMachineStateFromURL:completionHandler:")
    def _restore(rt: FakeRuntime, vm: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        url, handler = args

        def work() -> Any:
            try:
                with open(path_of(url), encoding="utf-8") as fh:
                    saved = fh.read()
            except OSError as err:
                return ("Stopped", rt.nserror(VZ, ERR_RESTORE, f"Failed to restore: {err}"))
            if saved != fingerprint(vm._fk.extra["config"]):
                return (
                    "Stopped",
                    rt.nserror(
                        VZ,
                        ERR_RESTORE,
                        "Failed to restore the virtual machine state.",
                        reason="The configuration does not match the saved state.",
                    ),
                )
            return None

        transition(rt, vm, spec.selector, handler, ("Stopped",), "Restoring", "Paused", work)

    # -- devices of a running VM -----------------------------------------------------------
    @on("VZVirtioTraditionalMemoryBalloonDevice", "setTargetVirtualMachineMemorySize:")
    def _balloon(rt: FakeRuntime, dev: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        value = args[0] // MIB * MIB
        value = max(k.min_memory, min(value, dev._fk.extra["memory"]))
        dev._fk.props["targetVirtualMachineMemorySize"] = value

    @on("VZVirtioSocketDevice", "setSocketListener:forPort:")
    def _listen(rt: FakeRuntime, dev: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        dev._fk.extra["listeners"][args[1]] = args[0]

    @on("VZVirtioSocketDevice", "removeSocketListenerForPort:")
    def _unlisten(rt: FakeRuntime, dev: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        dev._fk.extra["listeners"].pop(args[0], None)

    @on("VZVirtioSocketDevice", "connectToPort:completionHandler:")
    def _connect(rt: FakeRuntime, dev: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        port, handler = args
        vm = dev._fk.extra["vm"]()
        q = dev._fk.queue
        what = "the completion handler of connectToPort:completionHandler:"
        failure = rt.take_failure(spec.selector)
        if vm is None or state_name(rt, vm) != "Running" or failure is not None:
            err = rt.nserror("NSPOSIXErrorDomain", 57, "Socket is not connected")
            q.submit(lambda: rt.call_python(handler, None, err, what=what), wait=False)
            return
        if port not in rt.guest_ports:
            err = rt.nserror("NSPOSIXErrorDomain", ECONNRESET, "Connection reset by peer")
            q.submit(lambda: rt.call_python(handler, None, err, what=what), wait=False)
            return
        host_end, guest_end = socket.socketpair()
        rt.guest_sockets.append(guest_end)
        conn = rt.make(
            "VZVirtioSocketConnection",
            destinationPort=port,
            sourcePort=1024 + secrets.randbelow(60000),
        )
        conn._fk.extra["fd"] = host_end.detach()
        rt.guest_peers.setdefault(port, []).append(guest_end)
        q.submit(lambda: rt.call_python(handler, conn, None, what=what), wait=False)

    b[("VZVirtioSocketConnection", "fileDescriptor")] = lambda rt, c, s, a: c._fk.extra.get(
        "fd", -1
    )
    b[("VZVirtioSocketConnection", "close")] = lambda rt, c, s, a: close_connection(c)

    def _conn_dealloc(self: Any) -> None:
        fk = self.__dict__.get("_fk")
        if fk is not None:
            close_connection(self)

    type.__setattr__(rt.classes["VZVirtioSocketConnection"], "__del__", _conn_dealloc)

    @on("VZVirtioSocketListener", "setDelegate:")
    def _listener_delegate(
        rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]
    ) -> Any:
        obj._fk.extra["delegate"] = weak(args[0])

    b[("VZVirtioSocketListener", "delegate")] = lambda rt, obj, s, a: (
        obj._fk.extra.get("delegate") or (lambda: None)
    )()

    register_config(rt)
    register_mac(rt)
