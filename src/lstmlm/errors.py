"""The one exception type for user mistakes: the CLI prints its message as a single line."""


class LstmlmError(Exception):
    """A problem the user can fix (bad data, config, run directory, prompt...).

    The message names the problem and says what to do; the CLI prints it without a traceback.
    """
