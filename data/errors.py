"""The one exception the data layer raises for bad input, so callers can tell it from bugs."""


class DataError(ValueError):
    """Bad or missing data on disk, or a bad data setting.

    The message names the file or config field at fault and says how to fix it, so the
    CLI can print it as is instead of a traceback.
    """
