"""The one error interop raises for a user's mistake (the CLI prints it as one line)."""
from ..errors import UserError


class InteropError(UserError):
    """A checkpoint or config.json dist-train cannot read or represent, or a bad export
    request; the message names the file or key and the fix."""
