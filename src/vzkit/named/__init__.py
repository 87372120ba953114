"""Named VMs that live on: a supervisor per VM, reached by name from any process.

``_home`` (the state directory, names, records, locks), ``_control`` (the control socket's
wire), ``_supervisor`` (the process that owns a VM), ``_remote`` (a VM seen through its
supervisor: the backend ``Machine`` protocol over the control socket) and ``_api`` (the public
functions: ``vzkit.create``, ``connect``, ``list_vms``, ``remove_vm``).
"""
