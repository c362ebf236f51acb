"""The one error type users see. Library code raises it; the CLI prints it as one line."""


class AhmError(Exception):
    """A user-facing error: bad input, bad option, unreadable file.

    The message must name the file or option concerned and say what is wrong.
    """
