"""The strict Objective-C object model behind the stand-in modules.

Every class is generated from the API data. A message is accepted only when the selector
exists on the receiver's class chain, the simulated macOS version and architecture have it,
the argument count, kinds and nullability match (:mod:`._arguments`), blocks are callables
of the block's arity, ``NSError**`` out-parameters are passed as ``None`` (the result is then
``(value, error)``), the receiver was initialised by a designated initializer
(``NS_UNAVAILABLE`` ``-init``/``+new`` refused), and objects owned by a ``VZVirtualMachine``
are used on that VM's queue. A behaviour returning nil for a nonnull result is the stand-in's
own bug, recorded like a violation.

Every violation is recorded on the runtime *and* raised, so a violation that the code under
test swallows (say, in a completion handler) still fails the test at teardown.
"""

from __future__ import annotations

import inspect
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._appkit import check_main_thread
from ._arguments import ForeignObject, check_arg, check_result, default_result
from ._dispatch import FakeQueue, current_queue
from ._errors import BadArgument, ContractViolation, ObjCError, UnknownSelector
from ._spec import Api, ClassSpec, MethodSpec, Version, fmt_version, load_api, parse_version

__all__ = [
    "BadArgument",
    "ContractViolation",
    "FakeRuntime",
    "ForeignObject",
    "ObjCError",
    "UnknownSelector",
]


@dataclass
class Fk:
    """Per-instance bookkeeping of the stand-in (never visible through the API)."""

    initialized: bool = False
    props: dict[str, Any] = field(default_factory=dict)
    init_call: tuple[str, tuple[Any, ...]] | None = None
    queue: FakeQueue | None = None  # the VM queue this object must be used on
    extra: dict[str, Any] = field(default_factory=dict)


class Knobs:
    """What the simulated host answers (changed by tests)."""

    def __init__(self) -> None:
        self.vm_supported = True
        self.entitled = True
        self.nested_supported = True
        self.min_memory = 128 << 20
        self.max_memory = 64 << 30
        self.min_cpus = 1
        self.max_cpus = 10
        self.bridge_interfaces: tuple[str, ...] = ("en0", "en1")
        self.guest_honours_request_stop = True
        self.save_restore_supported = True
        self.hang: set[str] = set()  # selectors whose completion handler never fires
        self.op_delay = 0.0  # seconds before a lifecycle completion handler fires
        self.mac_hardware_supported = True  # VZMacHardwareModel.isSupported
        self.install_steps = 4  # progress updates of a macOS install
        self.install_step_s = 0.01
        #: VZLinuxRosettaDirectoryShare.availability: 0 not supported, 1 not installed,
        #: 2 installed; an install either succeeds or the user declines it.
        self.rosetta = 2
        self.rosetta_install_ok = True
        #: What ``+[VZMacOSRestoreImage fetchLatestSupportedWithCompletionHandler:]`` finds in
        #: Apple's catalogue (``write_fake_ipsw``'s keywords and a ``url``), or ``None``: the
        #: fetch fails as it does offline.
        self.latest_restore_image: dict[str, Any] | None = {
            "url": "https://updates.cdn-apple.com/fake/UniversalMac_15.1_24B83_Restore.ipsw",
            "build": "24B83",
            "version": (15, 1, 0),
            "min_cpus": 2,
            "min_memory_gb": 4,
        }


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


class StrictModule(types.ModuleType):
    """A module whose unknown attributes are contract violations."""

    def __init__(self, name: str, rt: FakeRuntime) -> None:
        super().__init__(name)
        self.__dict__["_fk_rt"] = rt
        self.__dict__["_fk_missing"] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        rt: FakeRuntime = self.__dict__["_fk_rt"]
        why = self.__dict__["_fk_missing"].get(name, "does not exist")
        raise rt.unknown(f"{self.__name__}.{name} {why}")


class FakeProtocol:
    """What ``objc.protocolNamed`` returns: a protocol of the API data, by name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<objc.formal_protocol {self.name}>"


def declares_protocol(cls: type, name: str) -> bool:
    """Whether Python class ``cls`` (or a Python base) declared protocol ``name``."""
    return any(name in getattr(k, "_fk_protocols", ()) for k in cls.__mro__)


class ObjCMeta(type):
    """Metaclass of every stand-in class: class methods and class properties by selector."""

    _fk_rt: FakeRuntime
    _fk_spec: ClassSpec

    def __new__(
        mcs, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kwargs: Any
    ) -> ObjCMeta:
        return super().__new__(mcs, name, bases, ns)

    def __init__(
        cls, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(name, bases, ns)
        if "_fk_spec" in ns:
            return
        # A Python subclass (a delegate): PyObjC derives selectors from method names, and
        # takes their types from the protocols the class declares (``protocols=[...]``);
        # a method no declared protocol types returns an object, as PyObjC's default.
        rt = cls._fk_rt
        if name in rt.python_classes:
            raise ObjCError(f"{name!r} is overriding an existing Objective-C class")
        rt.python_classes.add(name)
        type.__setattr__(cls, "_fk_python", True)
        unknown = set(kwargs) - {"protocols"}
        if unknown:
            raise TypeError(f"class {name}: unexpected keyword(s) {sorted(unknown)}")
        declared: set[str] = set()
        for proto in kwargs.get("protocols", ()):
            if not isinstance(proto, FakeProtocol):
                raise rt.violation(f"class {name}: protocols must be objc.protocolNamed(...)")
            declared.add(proto.name)
        type.__setattr__(cls, "_fk_protocols", frozenset(declared))
        for attr, value in ns.items():
            if attr.startswith("__") or not inspect.isfunction(value):
                continue
            if getattr(value, "_fk_python_method", False):
                continue
            params = list(inspect.signature(value).parameters.values())[1:]
            colons = attr.count("_")
            if len(params) != colons:
                raise rt.violation(
                    f"objc.BadPrototypeError: {name}.{attr} is selector "
                    f"{attr.replace('_', ':')!r} with {colons} argument(s) but the Python "
                    f"method takes {len(params)} (use @objc.python_method for helpers)"
                )
            for proto in rt.api.protocols.values():
                spec = proto.get(attr)
                if spec is not None and len(spec.args) != len(params):
                    raise rt.violation(f"{name}.{attr} does not match {spec.selector}")

    def __getattr__(cls, name: str) -> Any:
        if name.startswith(("__", "_fk")):
            raise AttributeError(name)
        return cls._fk_rt.resolve(cls, name, is_class=True)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise cls._fk_rt.violation(
            f"{cls.__name__}(...) called directly; build Objective-C objects with "
            "alloc().init...() (keyword constructors are not used by vzkit)"
        )


class FakeObject:
    """Base of the generated ``NSObject``."""

    _fk: Fk
    _fk_rt: FakeRuntime
    _fk_python = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith(("__", "_fk")):
            raise AttributeError(name)
        return self._fk_rt.resolve(self, name, is_class=False)

    def __setattr__(self, name: str, value: Any) -> None:
        if not type(self)._fk_python:
            raise self._fk_rt.violation(
                f"cannot set Python attribute {name!r} on a {type(self).__name__} instance"
            )
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"<fake {type(self).__name__} {id(self):#x}>"


class Bound:
    """A selector bound to its receiver; calling it sends the message."""

    __slots__ = ("receiver", "spec")

    def __init__(self, receiver: Any, spec: MethodSpec) -> None:
        self.receiver = receiver
        self.spec = spec

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        rt: FakeRuntime = self.receiver._fk_rt
        return rt.invoke(self.receiver, self.spec, args, kwargs)

    def __repr__(self) -> str:
        return f"<selector {self.spec.selector} of {self.receiver!r}>"


Behavior = Callable[["FakeRuntime", Any, MethodSpec, tuple[Any, ...]], Any]

_NSOBJECT = ClassSpec(
    name="NSObject",
    superclass=None,
    available=(10, 0),
    arm64_only=False,
    protocols=(),
    unavailable_init=False,
    framework="Foundation",
)
for _sel, _ret, _is_class in (
    ("alloc", "instancetype", True),
    ("new", "instancetype", True),
    ("init", "instancetype", False),
    ("retain", "instancetype", False),
    ("release", "void", False),
    ("autorelease", "instancetype", False),
    ("copy", "instancetype", False),
    ("description", "NSString", False),
    ("isKindOfClass:", "BOOL", False),
):
    _table = _NSOBJECT.klass if _is_class else _NSOBJECT.instance
    _table[_sel.replace(":", "_")] = MethodSpec(
        owner="NSObject",
        selector=_sel,
        is_class=_is_class,
        args=("Class",) * _sel.count(":"),
        returns=_ret,
        available=(10, 0),
    )


class FakeRuntime:
    """One simulated macOS host: classes, modules, queues, and the violations seen."""

    def __init__(
        self,
        api: Api | None = None,
        *,
        macos: str = "15.0",
        arch: str = "arm64",
        data: dict[str, Any] | None = None,
        nulls: dict[str, Any] | None = None,
    ) -> None:
        self.api = api if api is not None else load_api(data, nulls)
        self.macos: Version = parse_version(macos)
        self.arch = arch
        self.violations: list[str] = []
        self.calls: list[MethodSpec] = []
        self.knobs = Knobs()
        self.queues: list[FakeQueue] = []
        self.timers: list[threading.Timer] = []
        self.python_classes: set[str] = set()
        self.behaviors: dict[tuple[str, str], Behavior] = {}
        self.failures: dict[str, list[dict[str, Any]]] = {}
        self.guest_ports: set[int] = set()
        self.guest_sockets: list[Any] = []
        self.guest_peers: dict[int, list[Any]] = {}  # port -> guest ends of host connects
        self.vms: list[Any] = []
        # Mutation tests: rewrite the arguments of every message before it is checked (a
        # backend that passes the wrong thing).
        self.rewrite: Callable[[MethodSpec, tuple[Any, ...]], tuple[Any, ...]] | None = None
        self.lock = threading.RLock()
        self.main_queue = FakeQueue(self, b"com.apple.main-thread", main=True)
        self._global: FakeQueue | None = None
        self.classes: dict[str, ObjCMeta] = {}
        self._build_classes()
        self.appkit_events: list[tuple[str, Any]] = []  # what the user does (_appkit)
        self.windows: list[Any] = []
        self.application: Any = None
        from . import _appkit, _behaviors, _dispatch, _foundation, _modules

        _behaviors.register(self)
        _appkit.register(self)
        self.modules: dict[str, types.ModuleType] = {
            "AppKit": _appkit.make_module(self),
            "Virtualization": _modules.virtualization_module(self),
            "Foundation": _foundation.make_module(self),
            "objc": _modules.objc_module(self),
            "dispatch": _dispatch.make_module(self),
        }

    # -- violations --------------------------------------------------------------------------

    def violation(
        self, message: str, kind: type[ContractViolation] = ContractViolation
    ) -> ContractViolation:
        with self.lock:
            self.violations.append(message)
        return kind(message)

    def unknown(self, message: str) -> UnknownSelector:
        with self.lock:
            self.violations.append(message)
        return UnknownSelector(message)

    def call_python(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        """Call Python code from "Objective-C": an exception escaping it is a violation."""
        try:
            return fn(*args)
        except BaseException as err:
            self.violation(f"a Python exception escaped {what} into Objective-C: {err!r}")
            return None

    # -- classes -----------------------------------------------------------------------------

    def _build_classes(self) -> None:
        specs = dict(self.api.classes)
        specs["NSObject"] = _NSOBJECT
        base = ObjCMeta(
            "NSObject", (FakeObject,), {"_fk_spec": _NSOBJECT, "_fk_rt": self, "_fk_python": False}
        )
        self.classes["NSObject"] = base

        def make(name: str) -> ObjCMeta:
            if name in self.classes:
                return self.classes[name]
            spec = specs[name]
            parent = make(spec.superclass or "NSObject") if spec.superclass in specs else base
            cls = ObjCMeta(name, (parent,), {"_fk_spec": spec, "_fk_rt": self})
            self.classes[name] = cls
            return cls

        for name in specs:
            make(name)

    def spec_chain(self, cls: type) -> Iterator[ClassSpec]:
        for klass in cls.__mro__:
            spec = klass.__dict__.get("_fk_spec")
            if spec is not None:
                yield spec

    def exists(self, spec: ClassSpec) -> str | None:
        """Why the class is missing on the simulated host, or ``None`` when it exists."""
        if spec.available > self.macos:
            return f"is macOS {fmt_version(spec.available)}+ (simulated macOS {self.version})"
        if spec.arm64_only and self.arch != "arm64":
            return f"is arm64-only (simulated arch {self.arch})"
        return None

    @property
    def version(self) -> str:
        return fmt_version(self.macos)

    def resolve(self, receiver: Any, name: str, *, is_class: bool) -> Bound:
        cls = receiver if is_class else type(receiver)
        lookup = "init" if (is_class and name == "new") else name
        for spec in self.spec_chain(cls):
            table = spec.klass if (is_class and lookup != "init") else spec.instance
            method = table.get(lookup)
            if method is not None:
                if name == "new":
                    method = self.api_new(method)
                return Bound(receiver, method)
            if spec.unavailable_init and lookup == "init":
                raise self.violation(
                    f"{'+new' if name == 'new' else '-init'} is NS_UNAVAILABLE on "
                    f"{cls.__name__} (declared by {spec.name}); use a designated initializer"
                )
        raise self.unknown(
            f"{cls.__name__} has no {'class' if is_class else 'instance'} selector {name!r} "
            f"({name.replace('_', ':')}) in the API data"
        )

    def api_new(self, init: MethodSpec) -> MethodSpec:
        return MethodSpec(
            owner=init.owner,
            selector="new",
            is_class=True,
            args=(),
            returns="instancetype",
            available=init.available,
        )

    # -- objects -----------------------------------------------------------------------------

    def alloc(self, cls: type) -> Any:
        obj = object.__new__(cls)
        object.__setattr__(obj, "_fk", Fk())
        return obj

    def make(self, name: str, **props: Any) -> Any:
        """An initialised framework object (created by "the framework", not by the code)."""
        obj = self.alloc(self.classes[name])
        obj._fk.initialized = True
        obj._fk.props.update(props)
        return obj

    def foreign(self, kind: str) -> ForeignObject:
        """A value of a C type or framework the stand-in does not model (``SecCertificateRef``,
        ``vmnet_network_ref``, ``NSScreen``): the only thing accepted as an argument of it."""
        return ForeignObject(kind)

    def prop(self, obj: Any, name: str, default: Any = None) -> Any:
        """Read a property's stored value without sending a message (for assertions)."""
        return obj._fk.props.get(name, default)

    # -- message sending ---------------------------------------------------------------------

    def invoke(
        self, receiver: Any, spec: MethodSpec, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> Any:
        if self.rewrite is not None:
            args = self.rewrite(spec, args)
        cls = receiver if spec.is_class else type(receiver)
        where = f"{cls.__name__} {'+' if spec.is_class else '-'}{spec.selector}"
        if kw:
            raise self.violation(f"{where}: PyObjC methods take no keyword arguments ({kw})")
        own = next(self.spec_chain(cls), None)
        for klass in self.spec_chain(cls):
            if own is not None and klass is not own and klass.available > own.available:
                # A superclass the headers introduced later (VZGraphicsDisplayConfiguration,
                # 14.0, above VZMacGraphicsDisplayConfiguration, 12.0): a header refactoring;
                # the older subclass exists on older hosts.
                continue
            why = self.exists(klass)
            if why is not None:
                raise self.unknown(f"{where}: class {klass.name} {why}")
        if spec.available > self.macos:
            raise self.unknown(
                f"{where} is macOS {fmt_version(spec.available)}+ (simulated macOS {self.version})"
            )
        if spec.arm64_only and self.arch != "arm64":
            raise self.unknown(f"{where} is arm64-only (simulated arch {self.arch})")
        n_colons = spec.selector.count(":")
        if len(args) != len(spec.args) or len(args) != n_colons:
            raise self.violation(
                f"{where} takes {len(spec.args)} argument(s) ({', '.join(spec.args) or '-'}), "
                f"got {len(args)}"
            )
        if not spec.is_class:
            fk: Fk = receiver._fk
            if spec.is_init:
                if fk.initialized:
                    raise self.violation(f"{where}: object is already initialised")
            elif not fk.initialized and not receiver._fk_python:
                raise self.violation(f"{where}: message sent to an uninitialised object")
            # NSObject's own methods (isKindOfClass:, retain, ...) are thread-safe.
            if fk.queue is not None and not spec.is_init and spec.owner != "NSObject":
                here = current_queue()
                if here is not fk.queue:
                    raise self.violation(
                        f"{where} called off the VM's queue {fk.queue!r} "
                        f"(current: {here!r}, thread {threading.current_thread().name})"
                    )
        check_main_thread(self, spec, where)
        for index, (kind, value) in enumerate(zip(spec.args, args, strict=True)):
            check_arg(self, where, spec, index, kind, value)
        with self.lock:
            self.calls.append(spec)
        result = self.dispatch(receiver, spec, args)
        check_result(self, where, spec, result)
        return result

    def dispatch(self, receiver: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        cls = receiver if spec.is_class else type(receiver)
        for klass in self.spec_chain(cls):
            behavior = self.behaviors.get((klass.name, spec.selector))
            if behavior is not None:
                return behavior(self, receiver, spec, args)
        return self.default_behavior(receiver, spec, args)

    def default_behavior(self, receiver: Any, spec: MethodSpec, args: tuple[Any, ...]) -> Any:
        if spec.selector == "alloc":
            return self.alloc(receiver)
        if spec.selector == "new":
            obj = self.alloc(receiver)
            obj._fk.initialized = True
            return obj
        if spec.is_init:
            fk: Fk = receiver._fk
            fk.initialized = True
            fk.init_call = (spec.selector, args)
            self.store_init_props(receiver, spec, args)
            return (receiver, None) if spec.error_out else receiver
        if spec.role == "getter":
            store = receiver._fk.props if not spec.is_class else {}
            return store.get(spec.prop, default_result(spec.returns))
        if spec.role == "setter":
            value = args[0]
            receiver._fk.props[spec.prop] = tuple(value) if isinstance(value, list) else value
            return None
        if spec.selector in ("retain", "autorelease", "copy"):
            if spec.selector == "copy" and not any(
                "NSCopying" in c.protocols for c in self.spec_chain(type(receiver))
            ):
                raise self.unknown(f"{type(receiver).__name__} does not adopt NSCopying")
            return receiver
        if spec.selector == "isKindOfClass:":
            return isinstance(receiver, args[0])
        result = default_result(spec.returns)
        return (result, None) if spec.error_out else result

    def store_init_props(self, obj: Any, spec: MethodSpec, args: tuple[Any, ...]) -> None:
        """``initWithURL:readOnly:`` sets the ``URL`` and ``readOnly`` properties (if any)."""
        props: dict[str, MethodSpec] = {}
        for klass in self.spec_chain(type(obj)):
            for method in klass.instance.values():
                if method.prop and method.role == "getter":
                    props.setdefault(method.prop.lower(), method)
        parts = spec.selector.split(":")[:-1]
        if parts:
            parts[0] = parts[0].removeprefix("init").removeprefix("With")
        for part, value in zip(parts, args, strict=False):
            method = props.get(part.lower()) or props.get(_lower_first(part).lower())
            if method is not None and method.prop is not None:
                obj._fk.props[method.prop] = tuple(value) if isinstance(value, list) else value

    # -- failures injected by tests --------------------------------------------------------------

    def fail_next(
        self,
        selector: str,
        *,
        code: int = 1,
        description: str = "injected failure",
        domain: str = "VZErrorDomain",
        reason: str | None = None,
        state_after: str | None = None,
    ) -> None:
        """Make the next ``selector`` call report an NSError (through its handler or tuple)."""
        self.failures.setdefault(selector, []).append(
            {
                "code": code,
                "description": description,
                "domain": domain,
                "reason": reason,
                "state_after": state_after,
            }
        )

    def take_failure(self, selector: str) -> dict[str, Any] | None:
        with self.lock:
            pending = self.failures.get(selector)
            return pending.pop(0) if pending else None

    def nserror(
        self,
        domain: str,
        code: int,
        description: str,
        *,
        reason: str | None = None,
        suggestion: str | None = None,
        underlying: list[Any] | None = None,
    ) -> Any:
        info: dict[str, Any] = {"NSLocalizedDescription": description}
        if reason:
            info["NSLocalizedFailureReason"] = reason
        if suggestion:
            info["NSLocalizedRecoverySuggestion"] = suggestion
        if underlying:
            info["NSUnderlyingError"] = underlying[0]
            if len(underlying) > 1:
                info["NSMultipleUnderlyingErrorsKey"] = tuple(underlying)
        return self.make("NSError", domain=domain, code=code, userInfo=info)

    # -- queues --------------------------------------------------------------------------------

    def global_queue(self) -> FakeQueue:
        if self._global is None:
            self._global = FakeQueue(self, b"com.apple.root.default-qos")
            self.queues.append(self._global)
        return self._global

    def run_on(self, q: FakeQueue, fn: Callable[[], Any]) -> Any:
        """Test helper: run ``fn`` on ``q`` and return its result (exceptions re-raised)."""
        box: dict[str, Any] = {}

        def block() -> None:
            try:
                box["value"] = fn()
            except BaseException as err:
                box["error"] = err

        q.submit(block, wait=True)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def settle(self, timeout: float = 2.0) -> None:
        """Wait until every queue has run what was dispatched to it so far."""
        for q in list(self.queues):
            if not q.main and not q.closed:
                q.submit(lambda: None, wait=True)

    # -- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()
        for q in self.queues:
            q.close()
        for sock in self.guest_sockets:
            sock.close()
        self.guest_sockets.clear()
        for vm in self.vms:
            for device in vm._fk.extra.get("socket_devices", ()):
                device._fk.extra.get("listeners", {}).clear()
        self.vms.clear()


def weak(obj: Any) -> Callable[[], Any]:
    """A weak reference, as ObjC ``weak`` delegate properties hold."""
    if obj is None:
        return lambda: None
    return weakref.ref(obj)
