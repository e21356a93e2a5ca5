"""taskcodec: task-centric image compression for edge cameras.

This package is the torch-free core shared by the device and server side: entropy tables, range coding, the per-image
stream format, the model bundle and the wire format.
"""

__version__ = "0.1.0"
