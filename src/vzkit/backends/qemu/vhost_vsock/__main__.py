"""``python -m vzkit.backends.qemu.vhost_vsock``: run the device as a helper process."""

import sys

from ._helper import main

sys.exit(main())
