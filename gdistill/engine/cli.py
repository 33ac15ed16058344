"""The one entry every tool's ``main`` goes through (``run(main)`` under ``__main__``).

A known user error — a misspelt or out-of-range config key, an unknown type, a missing or
refused file, a checkpoint of another method, data that does not fit — is printed as one line,
``<tool>: error: <ErrorClass>: <message>`` (the message names the key or the file), and the tool
exits with status 2, as argparse does for a bad command line; a run that fails for a known
reason (the non-finite guard gave up, a peer stopped answering) is printed the same way and
exits with 1. Anything else is a bug and keeps its traceback. ``--debug`` on the command line
(removed before the tool parses its arguments) or ``GDISTILL_DEBUG=1`` in the environment
lets every error through with its full traceback."""
import os
import os.path as osp
import sys

# Exceptions whose message is the whole story (matched by class name along the MRO, so that
# this module needs none of the modules that define them).
USER_ERRORS = ('ConfigKeyError', 'ConfigValueError', 'UnknownTypeError', 'CheckpointError', 'CheckpointMismatchError',
               'DataMismatchError', 'DatasetFormatError', 'UnsafePickleError', 'FileNotFoundError',
               'NotADirectoryError', 'IsADirectoryError', 'PermissionError', 'SyntaxError', 'ValueError')
RUN_FAILURES = ('NonFiniteError', 'PeerFailureError')


def debug_requested(argv):
    return '--debug' in argv or os.environ.get('GDISTILL_DEBUG', '') not in ('', '0')


def one_line(err):
    """``ErrorClass: message`` on one line (the message's lines joined with '; ')."""
    text = str(err)
    if isinstance(err, KeyError) and type(err).__str__ is KeyError.__str__ and err.args:
        text = str(err.args[0])  # KeyError's str() adds quotes
    parts = [p.strip() for p in text.strip().splitlines() if p.strip()]
    message = parts[0] if parts else ''
    for part in parts[1:]:
        message += (' ' if message.endswith(':') else '; ') + part
    return f'{type(err).__name__}: {message}' if message else type(err).__name__


def kind_of(err):
    names = {c.__name__ for c in type(err).__mro__}
    if names & set(RUN_FAILURES):
        return 'run'
    if names & set(USER_ERRORS):
        return 'user'
    return None


def run(main, argv=None, prog=None):
    """Call ``main(argv)`` (``argv`` defaults to the command line without ``--debug``); a known
    error ends the process with one line on stderr and status 2 (user error) or 1 (run
    failure). Returns what ``main`` returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != '--debug']
    if debug:
        return main(argv)
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f'{prog or osp.basename(sys.argv[0])}: interrupted', file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        kind = kind_of(err)
        if kind is None:
            raise
        print(f'{prog or osp.basename(sys.argv[0])}: error: {one_line(err)}', file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        if kind == 'run' and type(err).__name__ == 'PeerFailureError':
            os._exit(1)  # a hung peer can block the process group's teardown at exit
        sys.exit(2 if kind == 'user' else 1)
