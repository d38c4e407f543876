"""The one exception type for problems the client caused.

Numeric modules raise it without importing kserve; `protocol.AudioDataPlane` turns it into
kserve's `InvalidInput`, which both the REST (400) and gRPC (INVALID_ARGUMENT) servers map for us.
"""


class ClientInputError(ValueError):
    """The request cannot be served as sent; the message tells the client what to fix."""
