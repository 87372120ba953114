"""The one exception hierarchy of vzkit.

Every error vzkit raises on purpose derives from :class:`VzkitError`. The classes defined here
are re-exported by ``vzkit``; the others belong to the module named on their line::

    VzkitError
    ├── SpecError (also ValueError)       a display/volume/network spec string is malformed
    ├── ConfigError (also ValueError)     a VM configuration is invalid or inconsistent
    ├── ArgumentError (also TypeError)    a call got an argument in a form it does not take
    ├── StateError                        an operation is not allowed in the VM's current state
    ├── VMNotFoundError (also LookupError)  no named VM of that name (vzkit.connect, rm, ...)
    ├── VMExistsError                     a named VM of that name exists already (create)
    ├── UnsupportedError                  a backend cannot do what was asked (.backend, .feature)
    │   └── MacOSVersionError             vzkit.backends.vz: the API needs a newer macOS
    ├── BackendUnavailableError           a backend cannot run here (missing QEMU, no PyObjC, ...)
    ├── SnapshotError                     saving, restoring or cataloguing a snapshot failed
    │   └── CopyAborted                   vzkit._diskcopy: a disk copy or checksum was cancelled
    ├── GuestError                        the guest (image, agent, command) failed
    │   ├── AgentError                    vzkit.agent: the agent refused or failed a request
    │   │   └── GuestFileNotFoundError (also FileNotFoundError)  the guest has no such path
    │   ├── CopyRefusedError              vzkit._hosttar: copy_out refused the guest's tar stream
    │   ├── ProtocolError                 vzkit.agent: the agent's peer broke the agent protocol
    │   ├── ResolveError                  vzkit.image: a Debian package set cannot be resolved
    │   │   ├── PackageNotFoundError (also ValueError)  no such package (.suggestions)
    │   │   └── UnsatisfiableError        a dependency or conflict cannot be met (.chain)
    │   ├── UnpackError                   vzkit.image: package files clash in a root tree
    │   ├── ImageFormatError (also ValueError)  vzkit.image.oci: an image, archive or layer is bad
    │   │   └── PlatformError             no manifest for the guest's arch (.available)
    │   └── DownloadError                 vzkit.image: a package download failed (.url, .status)
    │       ├── ChecksumError             size or SHA256 differs from the repository's index
    │       ├── RegistryError             vzkit.image.oci: a registry refused or failed (.code)
    │       │   └── RegistryAuthError     credentials refused, or wanted and none found
    │       └── MirrorError               a Debian mirror lacks or garbles what is needed
    │           ├── SignatureError        a Release file's signature is missing or wrong
    │           ├── ExpiredReleaseError   a Release file is stale or from the future
    │           └── MirrorFieldError      a field from the mirror is malformed or unsafe
    ├── VMError                           the VMM failed at run time (crashed, QMP error, timeout)
    │   ├── VMTimeoutError (also TimeoutError)
    │   ├── GuestPanic                    vzkit.backends.qemu: the guest kernel panicked
    │   │   (the user-space vsock device, vzkit.backends.qemu.vhost_vsock, drops bad input:)
    │   ├── VhostUserProtocolError        QEMU broke the vhost-user protocol
    │   ├── GuestMemoryError              an address is outside guest memory
    │   ├── RingError                     a virtqueue is unusable
    │   ├── ChainError                    one descriptor chain is malformed (.head)
    │   └── HandshakeError (also ValueError)  a host client's ``CONNECT <port>`` line is bad
    └── NSErrorDetails                    vzkit.backends.vz: the NSError behind an error, kept as
                                          its ``__cause__`` (never raised by itself)

Foreign errors (QMP errors, ``NSError``, ``OSError`` from the VMM) are translated once at
the boundary with ``raise ... from err`` so the original stays reachable as ``__cause__``.
``KeyboardInterrupt`` and ``asyncio.CancelledError`` are never wrapped.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "BackendUnavailableError",
    "ConfigError",
    "GuestError",
    "SnapshotError",
    "SpecError",
    "StateError",
    "UnsupportedError",
    "VMError",
    "VMExistsError",
    "VMNotFoundError",
    "VMTimeoutError",
    "VzkitError",
]


class VzkitError(Exception):
    """Root of every error vzkit raises on purpose."""


class SpecError(VzkitError, ValueError):
    """A command-line style spec (display, volume, network) could not be parsed."""


class ConfigError(VzkitError, ValueError):
    """A VM configuration is invalid: bad values, missing files, conflicting options."""


class ArgumentError(VzkitError, TypeError):
    """An argument has a form the call does not take, e.g. a command string for
    ``guest.run`` without ``shell=True`` (a list is one program and its arguments)."""


class StateError(VzkitError):
    """The VM is not in a state that allows the requested operation."""


class VMNotFoundError(VzkitError, LookupError):
    """No named VM has that name (``vzkit ls -a`` lists them)."""


class VMExistsError(VzkitError):
    """A named VM of that name exists already: pick another name or remove it first."""


class UnsupportedError(VzkitError):
    """The selected backend does not support a feature.

    ``backend`` and ``feature`` name what was asked of whom, so callers can branch on them.
    """

    def __init__(self, message: str, *, backend: str = "", feature: str = "") -> None:
        super().__init__(message)
        self.backend = backend
        self.feature = feature


class BackendUnavailableError(VzkitError):
    """A backend cannot run on this machine (e.g. QEMU missing, PyObjC absent)."""


class SnapshotError(VzkitError):
    """A snapshot could not be saved, restored, listed or deleted."""


class GuestError(VzkitError):
    """The guest image, the guest agent or a command in the guest failed."""


class VMError(VzkitError):
    """The virtual machine monitor failed at run time."""


class VMTimeoutError(VMError, TimeoutError):
    """A blocking VM operation did not finish within its ``timeout``."""
