"""The one exception type the command line turns into a clean one-line error."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, path).

    The CLI prints ``error: <message>`` on one line and exits with code 2; the message must
    name the file, key or line at fault. A traceback is shown only with ``--debug``.
    """

    exit_code = 2
