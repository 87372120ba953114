"""The ``AppKit`` stand-in: the application, the window and the view a VM's display needs.

The API data covers Virtualization and the Foundation calls a client makes; the AppKit part
a window needs is declared here, from AppKit's headers (``NSApplication.h``, ``NSWindow.h``,
``NSView.h``, ``NSEvent.h``): selectors, argument types and nullability. Every AppKit message,
and every message to a ``VZVirtualMachineView`` (an ``NSView``), must come from the main
thread. Events are what tests post (:func:`user_closes`): ``nextEventMatchingMask:...``
returns them on the main thread, after draining the main dispatch queue, as the real run
loop does.
"""

from __future__ import annotations

import threading
import time
import types
from typing import TYPE_CHECKING, Any

from ._spec import ClassSpec, MethodSpec, pyname

if TYPE_CHECKING:
    from ._runtime import FakeRuntime

__all__ = ["MAIN_THREAD_CLASSES", "appkit_protocols", "appkit_specs", "make_module", "user_closes"]

_NULLABLE, _NONNULL, _SCALAR = True, False, None
# class -> (superclass, instance methods, class methods); a method: selector -> (argument
# kinds, argument nullability, result kind, result nullability)
_API: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "NSResponder": ("NSObject", {}, {}),
    "NSView": (
        "NSResponder",
        {"initWithFrame:": (("NSRect",), (_SCALAR,), "instancetype", False)},
        {},
    ),
    "NSEvent": ("NSObject", {}, {}),
    "NSNotification": ("NSObject", {}, {}),
    "NSWindow": (
        "NSResponder",
        {
            "initWithContentRect:styleMask:backing:defer:": (
                ("NSRect", "NSUInteger", "NSUInteger", "BOOL"),
                (_SCALAR,) * 4,
                "instancetype",
                False,
            ),
            "setContentView:": (("NSView",), (_NULLABLE,), "void", None),
            "setTitle:": (("NSString",), (_NONNULL,), "void", None),
            "setDelegate:": (("id<NSWindowDelegate>",), (_NULLABLE,), "void", None),
            "setReleasedWhenClosed:": (("BOOL",), (_SCALAR,), "void", None),
            "makeKeyAndOrderFront:": (("id",), (_NULLABLE,), "void", None),
            "center": ((), (), "void", None),
            "close": ((), (), "void", None),
            "isVisible": ((), (), "BOOL", None),
        },
        {},
    ),
    "NSApplication": (
        "NSResponder",
        {
            "setActivationPolicy:": (("NSInteger",), (_SCALAR,), "BOOL", None),
            "activateIgnoringOtherApps:": (("BOOL",), (_SCALAR,), "void", None),
            "finishLaunching": ((), (), "void", None),
            "nextEventMatchingMask:untilDate:inMode:dequeue:": (
                ("uint64_t", "NSDate", "NSString", "BOOL"),
                (_SCALAR, _NULLABLE, _NONNULL, _SCALAR),
                "NSEvent",
                True,
            ),
            "sendEvent:": (("NSEvent",), (_NONNULL,), "void", None),
            "updateWindows": ((), (), "void", None),
        },
        {"sharedApplication": ((), (), "NSApplication", False)},
    ),
}
_CONSTANTS = {
    "NSApplicationActivationPolicyRegular": 0,
    "NSBackingStoreBuffered": 2,
    "NSWindowStyleMaskTitled": 1 << 0,
    "NSWindowStyleMaskClosable": 1 << 1,
    "NSWindowStyleMaskMiniaturizable": 1 << 2,
    "NSWindowStyleMaskResizable": 1 << 3,
    "NSEventMaskAny": (1 << 64) - 1,
}
#: Classes whose every message must come from the main thread.
MAIN_THREAD_CLASSES = frozenset([*_API, "VZVirtualMachineView"])


def _accessor(selector: str) -> tuple[str | None, str]:
    """A property's setter (``setTitle:``) or getter (``isVisible``), by AppKit's naming."""
    if selector.startswith("set") and selector.count(":") == 1:
        return selector[3].lower() + selector[4:-1], "setter"
    if selector == "isVisible":
        return "isVisible", "getter"
    return None, ""


def appkit_specs() -> dict[str, ClassSpec]:
    specs = {}
    for name, (superclass, instance, klass) in _API.items():
        spec = ClassSpec(
            name=name,
            superclass=superclass,
            available=(10, 0),
            arm64_only=False,
            protocols=(),
            unavailable_init=False,
            framework="AppKit",
        )
        for table, methods, is_class in (
            (spec.instance, instance, False),
            (spec.klass, klass, True),
        ):
            for selector, (args, nulls, returns, nil_return) in methods.items():
                prop, role = _accessor(selector)
                table[pyname(selector)] = MethodSpec(
                    owner=name,
                    selector=selector,
                    is_class=is_class,
                    args=args,
                    returns=returns,
                    available=(10, 0),
                    nulls=nulls,
                    nil_return=nil_return,
                    prop=prop,
                    role=role,
                )
        specs[name] = spec
    specs["NSView"].instance["init"] = MethodSpec(
        owner="NSView", selector="init", is_class=False, args=(), returns="instancetype",
        available=(10, 0), nil_return=False,
    )  # fmt: skip
    return specs


def appkit_protocols() -> dict[str, dict[str, MethodSpec]]:
    will_close = MethodSpec(
        owner="NSWindowDelegate",
        selector="windowWillClose:",
        is_class=False,
        args=("NSNotification",),
        returns="void",
        available=(10, 0),
    )
    return {"NSWindowDelegate": {pyname(will_close.selector): will_close}}


def user_closes(rt: FakeRuntime, window: Any) -> None:
    """The user clicks the window's close button: an event for the main thread's loop."""
    rt.appkit_events.append(("close", window))


def _on_main(rt: FakeRuntime, what: str) -> None:
    if threading.current_thread() is not threading.main_thread():
        raise rt.violation(f"{what} called off the main thread ({threading.current_thread().name})")


def register(rt: FakeRuntime) -> None:
    b = rt.behaviors

    def window_closes(window: Any) -> None:
        if window._fk.extra.get("closed"):
            return
        window._fk.extra["closed"] = True
        window._fk.props["isVisible"] = False
        ref = window._fk.extra.get("delegate")
        delegate = ref() if ref is not None else None
        fn = getattr(type(delegate), "windowWillClose_", None) if delegate is not None else None
        if fn is not None:
            note = rt.make("NSNotification")
            rt.call_python(fn, delegate, note, what="windowWillClose:")

    def window_init(rt: FakeRuntime, window: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        window._fk.initialized = True
        window._fk.props.update(frame=args[0], styleMask=args[1], isVisible=False)
        rt.windows.append(window)
        return window

    def set_delegate(rt: FakeRuntime, window: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        from ._runtime import weak

        window._fk.extra["delegate"] = weak(args[0])  # NSWindow's delegate is weak
        return None

    def order_front(rt: FakeRuntime, window: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        window._fk.props["isVisible"] = not window._fk.extra.get("closed", False)
        return None

    def close(rt: FakeRuntime, window: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        window_closes(window)
        return None

    def shared(rt: FakeRuntime, cls: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if rt.application is None:
            rt.application = rt.make("NSApplication")
        return rt.application

    def next_event(rt: FakeRuntime, app: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        rt.main_queue.drain()
        if rt.appkit_events:
            kind, target = rt.appkit_events.pop(0)
            return rt.make("NSEvent", kind=kind, target=target)
        time.sleep(0.002)  # the real call waits for an event up to untilDate: none came
        return None

    def send_event(rt: FakeRuntime, app: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        event = args[0]
        if event._fk.props.get("kind") == "close":
            window_closes(event._fk.props["target"])
        return None

    b[("NSWindow", "initWithContentRect:styleMask:backing:defer:")] = window_init
    b[("NSWindow", "setDelegate:")] = set_delegate
    b[("NSWindow", "makeKeyAndOrderFront:")] = order_front
    b[("NSWindow", "close")] = close
    b[("NSApplication", "sharedApplication")] = shared
    b[("NSApplication", "nextEventMatchingMask:untilDate:inMode:dequeue:")] = next_event
    b[("NSApplication", "sendEvent:")] = send_event


def make_module(rt: FakeRuntime) -> types.ModuleType:
    from ._runtime import StrictModule

    mod = StrictModule("AppKit", rt)
    for name in _API:
        setattr(mod, name, rt.classes[name])
    for name, value in _CONSTANTS.items():
        setattr(mod, name, value)

    def NSMakeRect(*args: Any) -> tuple[tuple[float, float], tuple[float, float]]:
        if len(args) != 4 or not all(isinstance(a, int | float) for a in args):
            raise rt.violation(f"NSMakeRect takes four numbers, got {args!r}")
        x, y, w, h = (float(a) for a in args)
        return ((x, y), (w, h))

    mod.NSMakeRect = NSMakeRect
    return mod


def check_main_thread(rt: FakeRuntime, spec: MethodSpec, where: str) -> None:
    """AppKit (and an ``NSView`` of Virtualization's) is used on the main thread only."""
    if spec.owner in MAIN_THREAD_CLASSES:
        _on_main(rt, where)
