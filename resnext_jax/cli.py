"""What the command-line tools share: a bad input is one line on stderr, `error: what is wrong;
how to fix it`, and exit status 1, with no traceback and nothing else around it. Light on
purpose (no JAX, no TensorFlow), so that arguments are checked before those start.

When the program is one of the package's tools (`python -m resnext_jax.NAME`), importing this
module first applies `runtime.quiet_start()`: each tool imports it before TensorFlow, so
TensorFlow's and libtpu's start-up lines stay off the screen. It also gives SIGPIPE its default
action, as Unix tools have it: `python -m resnext_jax.summary --list | head` ends quietly when
`head` has read enough, instead of with a BrokenPipeError traceback. A program of your own that
imports the package is left as it is."""
import argparse
import re
import signal
import sys

from resnext_jax import runtime

CONFIG_HINT = 'pass --config=configs/NAME.py[:ROW]'
HELP_FLAG = re.compile(r'--?(help|helpshort|helpfull|helpxml|\?)')


def _tool_is_the_program():
    spec = getattr(sys.modules.get('__main__'), '__spec__', None)
    return bool(spec and spec.name.startswith(f'{__package__}.'))


if _tool_is_the_program():
    runtime.quiet_start()
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)


def integer(low=1):
    """An argparse `type`: an integer ≥ `low`."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f'{text} is not an integer ≥ {low}')
        return value
    return parse


class ArgumentParser(argparse.ArgumentParser):
    """argparse with each bad argument one `error:` line and status 1 (argparse's own error is
    the usage and `PROG: error: ...`, status 2). Set `prog`, the command the hint names."""

    def error(self, message):
        self.exit(1, f'error: {message.removeprefix("argument ")}; {self.prog} --help '
                     'describes every option\n')


def flag_error(e, argv, hint):
    """An error of absl's flag parsing (with ml_collections' --config: a missing file, a file
    whose get_config raised, a --config.FIELD the config lacks) as one `error:` line."""
    text = ' '.join(line.strip() for line in str(e).splitlines() if line.strip())
    if 'Traceback (most recent call last):' in text:   # the config file raised
        flag = text.split(': Error whilst parsing')[0].removeprefix('flag ')
        return f'error: {flag}: {re.sub(r"^[A-Za-z_.]+: ", "", str(e).strip().splitlines()[-1])}'
    fields = [a.split('=')[0] for a in argv if a.startswith('--config.')]
    field = next((f for f in fields if re.search(rf'\b{re.escape(f.split(".")[-1])}\b', text)),
                 None)
    if isinstance(e, (AttributeError, KeyError)) and field:   # the message names the field
        close = re.search(r'Did you mean "(\w+)"', text)
        return (f'error: {field}: the config has no such field; ' +
                (f'did you mean {field.rsplit(".", 1)[0]}.{close[1]}?' if close else
                 'configs/default.py declares every field'))
    errno = re.search(r"\[Errno (\d+)\] ([^:]+): '(.*?)'", text)
    if isinstance(e, OSError) and errno:
        what = 'does not exist' if errno[1] == '2' else f'cannot be read ({errno[2]})'
        return f'error: the --config file {errno[3]} {what}: {CONFIG_HINT}'
    if type(e).__module__.startswith('absl'):   # an unknown flag, a value of the wrong type
        return f'error: {text.rstrip(".")}; {hint}'
    return f'error: cannot load the --config file ({type(e).__name__}: {text}); {CONFIG_HINT}'


def parse_flags(argv, hint, info=False):
    """absl's flag parsing, for `app.run(main, flags_parser=...)`, with each bad flag one line
    (absl's own: `FATAL Flags parsing error` and a second line, or a traceback) and --help
    exiting 0 (absl's exits 1, the status of bad input). `hint` says where the flags are
    listed. Unless `info`, INFO logs (TFDS: "Constructing tf.data.Dataset") stay off unless
    --verbosity=0 asks for them: absl's app.run turns them on."""
    from absl import flags
    try:
        rest = flags.FLAGS(argv)
        if 'config' in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.keys()   # a config file that failed to load raises when used
    except Exception as e:   # noqa: BLE001 (a config file may raise anything)
        sys.exit(flag_error(e, argv, hint))
    except SystemExit as e:   # --help printed the flags
        sys.exit(0 if e.code == 1 and any(HELP_FLAG.fullmatch(a) for a in argv) else e.code)
    if len(rest) > 1:
        sys.exit(f'error: unexpected arguments {" ".join(rest[1:])!r}: flags are written '
                 f'--name=value; {hint}')
    if not info and flags.FLAGS['verbosity'].using_default_value:
        flags.FLAGS.verbosity = -1   # WARNING
    return rest
