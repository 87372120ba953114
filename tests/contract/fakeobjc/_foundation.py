"""The ``Foundation`` stand-in: the Foundation and CFRunLoop calls listed in the API data.

Only the selectors ``foundation_used`` names exist, typed by their header signatures
(:mod:`._foundation_api`); behaviour is the small part of Foundation a VM client relies on:
file URLs, NSData bytes, file handles that own (or do not own) their descriptors, NSError's
fields, and run loops that drain the main queue on the main thread.
"""

from __future__ import annotations

import os
import threading
import time
import types
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from ._runtime import FakeRuntime
    from ._spec import MethodSpec

ERROR_KEYS = {
    "NSUnderlyingErrorKey": "NSUnderlyingError",
    "NSMultipleUnderlyingErrorsKey": "NSMultipleUnderlyingErrorsKey",
    "NSLocalizedDescriptionKey": "NSLocalizedDescription",
    "NSLocalizedFailureReasonErrorKey": "NSLocalizedFailureReason",
    "NSLocalizedRecoverySuggestionErrorKey": "NSLocalizedRecoverySuggestion",
}
RUN_LOOP_CONSTANTS = {
    "NSDefaultRunLoopMode": "kCFRunLoopDefaultMode",
    "kCFRunLoopDefaultMode": "kCFRunLoopDefaultMode",
    "kCFRunLoopCommonModes": "kCFRunLoopCommonModes",
}


def _str(rt: FakeRuntime, spec: MethodSpec, value: Any) -> str:
    if not isinstance(value, str):
        raise rt.violation(f"{spec.owner} {spec.selector}: expected a str, got {value!r}")
    return value


def register(rt: FakeRuntime) -> None:
    b = rt.behaviors

    def on(cls: str, selector: str) -> Any:
        def deco(fn: Any) -> Any:
            b[(cls, selector)] = fn
            return fn

        return deco

    # -- NSURL ---------------------------------------------------------------------------------
    def url(path: str) -> Any:
        return rt.make("NSURL", path=os.path.abspath(path))

    @on("NSURL", "fileURLWithPath:")
    def _file_url(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return url(_str(rt, spec, args[0]))

    @on("NSURL", "fileURLWithPath:isDirectory:")
    def _file_url_dir(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if not isinstance(args[1], bool):
            raise rt.violation(f"NSURL {spec.selector}: isDirectory must be a bool")
        return url(_str(rt, spec, args[0]))

    @on("NSURL", "URLWithString:")
    def _url_string(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        text = _str(rt, spec, args[0])
        return rt.make("NSURL", path=text.removeprefix("file://"), string=text)

    @on("NSURL", "path")
    def _path(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return obj._fk.props["path"]

    @on("NSURL", "absoluteString")
    def _abs(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return obj._fk.props.get("string") or "file://" + quote(obj._fk.props["path"])

    @on("NSURL", "isFileURL")
    def _is_file(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return "string" not in obj._fk.props

    @on("NSURL", "URLByAppendingPathComponent:")
    def _append(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return url(os.path.join(obj._fk.props["path"], _str(rt, spec, args[0])))

    @on("NSURL", "fileSystemRepresentation")
    def _fsrep(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return os.fsencode(obj._fk.props["path"])

    @on("NSURL", "checkResourceIsReachableAndReturnError:")
    def _reach(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if os.path.exists(obj._fk.props["path"]):
            return (True, None)
        return (False, rt.nserror("NSCocoaErrorDomain", 260, "The file doesn't exist."))

    # -- NSData --------------------------------------------------------------------------------
    @on("NSData", "data")
    def _data(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return rt.make("NSData", bytes=b"")

    @on("NSData", "dataWithBytes:length:")
    def _with_bytes(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        raw, length = args
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise rt.violation(f"NSData dataWithBytes:length: needs a bytes-like, got {raw!r}")
        if not isinstance(length, int) or not 0 <= length <= len(raw):
            raise rt.violation(f"NSData dataWithBytes:length: bad length {length!r}")
        return rt.make("NSData", bytes=bytes(raw[:length]))

    @on("NSData", "dataWithContentsOfURL:")
    def _contents(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        try:
            with open(args[0]._fk.props["path"], "rb") as fh:
                return rt.make("NSData", bytes=fh.read())
        except OSError:
            return None

    @on("NSData", "bytes")
    def _bytes(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return obj._fk.props["bytes"]

    @on("NSData", "length")
    def _length(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return len(obj._fk.props["bytes"])

    @on("NSData", "writeToURL:atomically:")
    def _write(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        try:
            with open(args[0]._fk.props["path"], "wb") as fh:
                fh.write(obj._fk.props["bytes"])
        except OSError:
            return False
        return True

    # -- NSFileHandle --------------------------------------------------------------------------
    def handle(fd: int, close_on_dealloc: bool) -> Any:
        obj = rt.make("NSFileHandle", fd=fd)
        obj._fk.extra["close_on_dealloc"] = close_on_dealloc
        return obj

    def check_fd(spec: MethodSpec, fd: Any) -> int:
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise rt.violation(f"NSFileHandle {spec.selector}: bad file descriptor {fd!r}")
        try:
            os.fstat(fd)
        except OSError as err:
            raise rt.violation(f"NSFileHandle {spec.selector}: fd {fd} is not open") from err
        return fd

    @on("NSFileHandle", "initWithFileDescriptor:")
    def _init_fd(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        obj._fk.initialized = True
        obj._fk.props["fd"] = check_fd(spec, args[0])
        obj._fk.extra["close_on_dealloc"] = False
        return obj

    @on("NSFileHandle", "initWithFileDescriptor:closeOnDealloc:")
    def _init_fd2(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if not isinstance(args[1], bool):
            raise rt.violation(f"NSFileHandle {spec.selector}: closeOnDealloc must be a bool")
        obj._fk.initialized = True
        obj._fk.props["fd"] = check_fd(spec, args[0])
        obj._fk.extra["close_on_dealloc"] = args[1]
        return obj

    for selector, fd in (("fileHandleWithStandardInput", 0), ("fileHandleWithStandardOutput", 1)):
        b[("NSFileHandle", selector)] = lambda rt, cls, spec, args, fd=fd: handle(fd, False)

    @on("NSFileHandle", "fileHandleWithNullDevice")
    def _null(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return handle(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC), True)

    for selector, flags in (
        ("fileHandleForReadingAtPath:", os.O_RDONLY),
        ("fileHandleForWritingAtPath:", os.O_WRONLY),
        ("fileHandleForUpdatingAtPath:", os.O_RDWR),
    ):

        def _open(
            rt: FakeRuntime, cls: Any, spec: MethodSpec, args: Any, flags: int = flags
        ) -> Any:
            try:
                return handle(os.open(_str(rt, spec, args[0]), flags | os.O_CLOEXEC), True)
            except OSError:
                return None

        b[("NSFileHandle", selector)] = _open

    @on("NSFileHandle", "fileDescriptor")
    def _fd(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        return obj._fk.props["fd"]

    def close_handle(obj: Any) -> None:
        if obj._fk.extra.pop("close_on_dealloc", False):
            try:
                os.close(obj._fk.props["fd"])
            except OSError:
                pass

    @on("NSFileHandle", "closeFile")
    def _close(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        close_handle(obj)

    @on("NSFileHandle", "closeAndReturnError:")
    def _close2(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        close_handle(obj)
        return (True, None)

    def _dealloc(self: Any) -> None:
        fk = self.__dict__.get("_fk")
        if fk is not None and fk.extra.get("close_on_dealloc"):
            close_handle(self)

    type.__setattr__(rt.classes["NSFileHandle"], "__del__", _dealloc)

    # -- NSError -------------------------------------------------------------------------------
    @on("NSError", "errorWithDomain:code:userInfo:")
    def _error(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        domain, code, info = args
        if not isinstance(code, int):
            raise rt.violation(f"NSError {spec.selector}: code must be an int")
        return rt.make("NSError", domain=_str(rt, spec, domain), code=code, userInfo=info or {})

    for field in ("domain", "code", "userInfo"):
        b[("NSError", field)] = lambda rt, obj, spec, args, field=field: obj._fk.props[field]

    def info(obj: Any) -> dict[str, Any]:
        value: dict[str, Any] = obj._fk.props.get("userInfo") or {}
        return value

    @on("NSError", "localizedDescription")
    def _desc(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        default = (
            f"The operation couldn't be completed. ({obj._fk.props['domain']} error "
            f"{obj._fk.props['code']}.)"
        )
        return info(obj).get("NSLocalizedDescription", default)

    b[("NSError", "localizedFailureReason")] = lambda rt, obj, spec, args: info(obj).get(
        "NSLocalizedFailureReason"
    )
    b[("NSError", "localizedRecoverySuggestion")] = lambda rt, obj, spec, args: info(obj).get(
        "NSLocalizedRecoverySuggestion"
    )

    @on("NSError", "underlyingErrors")
    def _underlying(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        data = info(obj)
        if "NSMultipleUnderlyingErrorsKey" in data:
            return tuple(data["NSMultipleUnderlyingErrorsKey"])
        return (data["NSUnderlyingError"],) if "NSUnderlyingError" in data else ()

    # -- run loops, dates, misc ----------------------------------------------------------------
    main_loop = rt.make("NSRunLoop", main=True)

    b[("NSRunLoop", "mainRunLoop")] = lambda rt, cls, spec, args: main_loop
    b[("NSRunLoop", "currentRunLoop")] = lambda rt, cls, spec, args: (
        main_loop
        if threading.current_thread() is threading.main_thread()
        else rt.make("NSRunLoop", main=False)
    )

    def pump(loop: Any, seconds: float, once: bool) -> bool:
        on_main = threading.current_thread() is threading.main_thread()
        if loop._fk.props.get("main") and not on_main:
            raise rt.violation("the main run loop may only be run on the main thread")
        if on_main and rt.main_queue.pending():
            rt.main_queue.drain(1 if once else None)
            return True
        time.sleep(min(max(seconds, 0.0), 0.005))  # a run loop idling, as the real one does
        return False

    def until(date: Any) -> float:
        if date is None or date._fk.props.get("t") is None:
            raise rt.violation("NSRunLoop needs an NSDate")
        return float(date._fk.props["t"] - time.monotonic())

    b[("NSRunLoop", "runMode:beforeDate:")] = lambda rt, loop, spec, args: (
        pump(loop, until(args[1]), True) or True
    )
    b[("NSRunLoop", "runUntilDate:")] = lambda rt, loop, spec, args: (
        pump(loop, until(args[0]), False) and None
    )

    def _run_forever(rt: FakeRuntime, *args: Any) -> Any:
        raise rt.violation("-[NSRunLoop run] never returns; use runMode:beforeDate:")

    b[("NSRunLoop", "run")] = _run_forever
    b[("NSDate", "date")] = lambda rt, cls, spec, args: rt.make("NSDate", t=time.monotonic())
    b[("NSDate", "distantFuture")] = lambda rt, cls, spec, args: rt.make("NSDate", t=1e12)
    b[("NSDate", "dateWithTimeIntervalSinceNow:")] = lambda rt, cls, spec, args: rt.make(
        "NSDate", t=time.monotonic() + float(args[0])
    )
    b[("NSFileManager", "defaultManager")] = lambda rt, cls, spec, args: rt.make("NSFileManager")
    b[("NSFileManager", "fileExistsAtPath:")] = lambda rt, obj, spec, args: os.path.exists(
        _str(rt, spec, args[0])
    )

    @on("NSFileManager", "removeItemAtURL:error:")
    def _remove(rt: FakeRuntime, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        try:
            os.unlink(args[0]._fk.props["path"])
        except OSError as err:
            return (False, rt.nserror("NSPOSIXErrorDomain", err.errno or 0, str(err)))
        return (True, None)


def make_module(rt: FakeRuntime) -> types.ModuleType:
    from ._runtime import StrictModule

    register(rt)
    mod = StrictModule("Foundation", rt)
    mod.NSObject = rt.classes["NSObject"]
    for name, spec in rt.api.classes.items():
        if spec.framework == "Foundation":
            setattr(mod, name, rt.classes[name])
    for name in rt.api.foundation_constants:
        value = ERROR_KEYS.get(name) or RUN_LOOP_CONSTANTS.get(name)
        if value is not None:
            setattr(mod, name, value)
    for name in rt.api.cf_constants:
        setattr(mod, name, RUN_LOOP_CONSTANTS.get(name, name))
    for name, value in rt.api.cf_enums.items():
        setattr(mod, name, value)
    main_rl = object()

    def arity(name: str, args: tuple[Any, ...], n: int) -> None:
        if len(args) != n:
            raise rt.violation(f"Foundation.{name}() takes {n} arguments, got {len(args)}")

    def CFRunLoopRunInMode(*args: Any) -> int:
        arity("CFRunLoopRunInMode", args, 3)
        mode, seconds, once = args
        if not isinstance(mode, str) or not isinstance(seconds, int | float):
            raise rt.violation(f"CFRunLoopRunInMode({mode!r}, {seconds!r}, ...): bad arguments")
        if threading.current_thread() is not threading.main_thread():
            return int(rt.api.cf_enums.get("kCFRunLoopRunFinished", 1))
        if rt.main_queue.pending():
            rt.main_queue.drain(1 if once else None)
            return int(rt.api.cf_enums.get("kCFRunLoopRunHandledSource", 4))
        time.sleep(min(max(float(seconds), 0.0), 0.005))  # a run loop idling, as the real one
        return int(rt.api.cf_enums.get("kCFRunLoopRunTimedOut", 3))

    def CFRunLoopGetMain(*args: Any) -> object:
        arity("CFRunLoopGetMain", args, 0)
        return main_rl

    def CFRunLoopGetCurrent(*args: Any) -> object:
        arity("CFRunLoopGetCurrent", args, 0)
        return main_rl if threading.current_thread() is threading.main_thread() else object()

    def CFRunLoopStop(*args: Any) -> None:
        arity("CFRunLoopStop", args, 1)

    def CFRunLoopWakeUp(*args: Any) -> None:
        arity("CFRunLoopWakeUp", args, 1)

    def CFRunLoopRun(*args: Any) -> None:
        raise rt.violation("CFRunLoopRun() blocks until stopped; use CFRunLoopRunInMode")

    for fn in (
        CFRunLoopRunInMode,
        CFRunLoopGetMain,
        CFRunLoopGetCurrent,
        CFRunLoopStop,
        CFRunLoopWakeUp,
        CFRunLoopRun,
    ):
        if fn.__name__ in rt.api.cf_functions:
            setattr(mod, fn.__name__, fn)
    return mod
