"""Bounds on what a guest can make the controller or a host store. Light on imports: the CLI reads these for its
option defaults without loading SSH or libvirt."""

from __future__ import annotations

# A copy out of a guest (hvctl cp, hvctl checkpoint, checkpoint migration) stops here unless the caller asks for
# more: the guest decides how much it sends.
DEFAULT_MAX_DOWNLOAD_BYTES = 8 << 30
