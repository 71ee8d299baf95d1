"""The one error type that the CLI turns into a single line and exit code 2."""


class BadInput(Exception):
    """User input the tool cannot act on: unknown task, mask or path, malformed data."""
