"""The vz backend's part of :func:`vzkit.doctor.report`: can this interpreter create VMs?"""

from __future__ import annotations

import sys

from ...doctor import Check
from ._objc import availability_problem

__all__ = ["doctor_checks"]


def doctor_checks() -> list[Check]:
    """One check: macOS version, PyObjC, hardware support and this interpreter's
    ``com.apple.security.virtualization`` entitlement (:func:`availability_problem`)."""
    problem = availability_problem()
    if problem is not None:
        return [Check(name="Virtualization", ok=False, detail=problem)]
    return [Check(name="Virtualization", ok=True, detail=f"usable by {sys.executable}")]
