"""Command-line overrides for a script's typed globals, nanoGPT style.

A script declares its hyper-parameters as plain globals with typed defaults and a comment, then
calls `configure(globals(), keys)`:

    _before = set(globals())
    max_res = 256        # last resolution, a power of two
    resume = False       # continue from out_dir/ckpt.pt
    CONFIG_KEYS = sorted(set(globals()) - _before - {'_before'})
    configure(globals(), CONFIG_KEYS)

    python train.py --max_res=128 --resume True

The default's type decides how a value is parsed: bools take True/False/1/0 (also yes/no, on/off),
a bare `--flag` means True; ints and floats their usual text, tuples/lists/dicts a Python literal, strings anything.
An unknown key or a badly typed value stops the script with a message that names the key, the
expected type and the closest valid names; `--help` lists every global with its default and comment.
"""
import ast
import difflib
import re
import sys

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('0', 'false', 'no', 'off')


def _comments(path):
    """name -> trailing comment of its `name = ...  # comment` line in the script's source."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except (OSError, TypeError):
        return {}
    found = {}
    for line in lines:
        m = re.match(r'^([A-Za-z_]\w*)\s*(?::[^=]*)?=[^#]*#\s*(.*)$', line.rstrip())
        if m and m.group(1) not in found:
            found[m.group(1)] = m.group(2)
    return found


def _parse(key, old, text):
    """text -> a value of type(old), or SystemExit naming the key and what it expected."""
    kind = type(old).__name__
    try:
        if isinstance(old, bool):
            low = text.strip().lower()
            if low in _TRUE or low in _FALSE:
                return low in _TRUE
            raise ValueError
        if isinstance(old, int):
            try:
                return int(text)
            except ValueError:
                as_float = float(text)          # accept 2.4e3 for an int when it is integral
                if not as_float.is_integer():
                    raise
                return int(as_float)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, (tuple, list, dict)):
            new = ast.literal_eval(text)
            if isinstance(old, dict) != isinstance(new, dict):
                raise ValueError
            return type(old)(new) if not isinstance(old, dict) else new
        return text
    except (ValueError, SyntaxError, TypeError):
        hint = 'True/False/1/0' if isinstance(old, bool) else f'a {kind} like {old!r}'
        raise SystemExit(f'error: --{key}={text!r} is not a valid {kind}; expected {hint}')


def _usage(g, keys):
    notes = _comments(g.get('__file__'))
    script = g.get('__file__', 'script')
    rows = [f'usage: python {script} [--key=value | --key value] ...', '', 'options (default, meaning):']
    width = max((len(k) for k in keys), default=0)
    for k in keys:
        rows.append(f'  --{k:<{width}}  {g[k]!r:<14}  {notes.get(k, "")}'.rstrip())
    return '\n'.join(rows)


def configure(g, keys, argv=None):
    """Override the globals named in `keys` of the dict `g` from argv (default sys.argv[1:]).

    Returns {key: new value} for what was overridden; prints one line per override.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = list(keys)
    done = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ('-h', '--help'):
            print(_usage(g, keys))
            raise SystemExit(0)
        if not arg.startswith('--'):
            raise SystemExit(f'error: expected --key=value, got {arg!r} (see --help)')
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f'; did you mean {", ".join("--" + c for c in close)}?' if close else ''
            raise SystemExit(f'error: unknown option --{key}{hint} (see --help for all options)')
        if not eq and isinstance(g[key], bool) and (i >= len(argv) or argv[i].startswith('--')):
            text, eq = 'True', '='                    # a bare boolean flag: --compile
        if not eq:
            if i >= len(argv):
                raise SystemExit(f'error: --{key} needs a value, e.g. --{key}={g[key]!r}')
            text = argv[i]
            i += 1
        g[key] = done[key] = _parse(key, g[key], text)
        print(f'override {key} = {g[key]!r}')
    return done
