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
A dict default (a per-resolution table) also takes one number, which the script spreads over its table.
An unknown key or a badly typed value stops the script with a message that names the key, the
expected type and the closest valid names; `--help` lists every global with its default and comment.

Each script also lists the valid values of every global in one table of rules (`one_of`,
`between`, `integer`, `power_of_two`, `per_resolution`, ...) and calls `check(cfg, RULES)` before it
reads or writes anything: a bad value stops it with one line naming the option, what it got and
what is valid.
"""
import ast
import difflib
import os
import re
import sys

_TRUE = ('1', 'true', 'yes', 'on')
_KINDS = dict(int='an integer', float='a number', str='a string', tuple='a tuple', list='a list')
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
            if isinstance(old, dict) and isinstance(new, (int, float)) and not isinstance(new, bool):
                return new                  # --batch_size=8: the script puts 8 at every key of its table
            if isinstance(old, dict) != isinstance(new, dict):
                raise ValueError
            return type(old)(new) if not isinstance(old, dict) else new
        return text
    except (ValueError, SyntaxError, TypeError):
        hint = ('True/False/1/0' if isinstance(old, bool) else f'one number, or a dict like {old!r}'
                if isinstance(old, dict) else f'{_KINDS.get(kind, "a " + kind)} like {old!r}')
        raise SystemExit(f'error: --{key}={text!r} is not valid; expected {hint}')


def _usage(g, keys, values, header=''):
    notes = _comments(g.get('__file__'))
    script = g.get('__file__', 'script')
    rows = [f'usage: python {script} [--key=value | --key value] ...', '',
            f'options ({header or "default"}, meaning):']
    width = max((len(k) for k in keys), default=0)
    for k in keys:
        rows.append(f'  --{k:<{width}}  {values[k]!r:<14}  {notes.get(k, "")}'.rstrip())
    return '\n'.join(rows)


def configure(g, keys, argv=None, shown=None):
    """Override the globals named in `keys` of the dict `g` from argv (default sys.argv[1:]).

    Returns {key: new value} for what was overridden; prints one line per override. `--help` prints
    every key with its value and comment, then exits: the global's value, or with `shown` the value
    that shown({key: value given}) says will run (a script whose presets replace globals).
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = list(keys)
    done, want_help = {}, False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ('-h', '--help'):
            want_help = True
            continue
        if not arg.startswith('--'):
            raise SystemExit(f'error: expected --key=value, got {arg!r} (see --help)')
        key, eq, text = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            hint = f'; did you mean {", ".join("--" + c for c in close)}?' if close else ''
            raise SystemExit(f'error: unknown option --{key}{hint} (see --help for all options)')
        if not eq and isinstance(g[key], bool) and (i >= len(argv) or argv[i].startswith('-')):
            text, eq = 'True', '='                    # a bare boolean flag: --compile
        if not eq:
            if i >= len(argv):
                raise SystemExit(f'error: --{key} needs a value, e.g. --{key}={g[key]!r}')
            text = argv[i]
            i += 1
        done[key] = _parse(key, g[key], text)
    if want_help:
        values = {**g, **shown(done)} if shown else {**g, **done}
        print(_usage(g, keys, values, 'the values that run with the options given' if done or shown else ''))
        raise SystemExit(0)
    for key, value in done.items():
        g[key] = value
        print(f'override {key} = {value!r}')
    return done


# ---------------------------------------------------------------------------------------------
# Valid values

class Rule:
    """What a valid value is: `text` says it in the error message, `ok(value)` tests it; `clean(value)`
    is the value the script uses (a path with ~ and $VARS expanded)."""

    def __init__(self, text, ok, clean=None):
        self.text, self.ok, self.clean = text, ok, clean or (lambda v: v)

    def problem(self, value):
        """'' when value is valid, else what was expected."""
        try:
            return '' if self.ok(value) else self.text
        except TypeError:                               # e.g. a number compared with a string
            return self.text


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v    # NaN is not a number here


ANY = Rule('anything', lambda v: True)


def expand_path(text):
    """~ and $VARS expanded: the shell leaves them alone after --key=."""
    return os.path.expandvars(os.path.expanduser(text)) if isinstance(text, str) else text


PATH = Rule('a path', lambda v: isinstance(v, str), expand_path)
PATHS = Rule('a folder or comma-separated files', lambda v: isinstance(v, str),
             lambda v: ','.join(expand_path(p) for p in v.split(',')) if isinstance(v, str) else v)


def one_of(*choices):
    return Rule('one of ' + ', '.join(repr(c) for c in choices), lambda v: v in choices)


def between(lo, hi, open_hi=False):
    return Rule(f'a number in [{lo}, {hi}{")" if open_hi else "]"}',
                lambda v: _number(v) and lo <= v and (v < hi if open_hi else v <= hi))


def at_least(lo):
    return Rule(f'a number >= {lo}', lambda v: _number(v) and v >= lo)


def above(lo):
    return Rule(f'a number > {lo}', lambda v: _number(v) and v > lo)


def integer(lo):
    return Rule(f'a whole number >= {lo}', lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo)


def power_of_two(lo, hi):
    return Rule(f'a power of two in {lo}..{hi}', lambda v: isinstance(v, int) and lo <= v <= hi and v & (v - 1) == 0)


def matches(pattern, text):
    return Rule(text, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None)


class per_resolution(Rule):
    """A table {resolution: value}, each value valid under `rule`; the error names the first bad entry."""

    def __init__(self, rule):
        super().__init__(f'{rule.text} at every resolution', lambda v: not self.problem(v))
        self.rule = rule

    def problem(self, value):
        if not isinstance(value, dict):
            return 'one number or a dict {resolution: value}'
        for r, x in value.items():
            if not power_of_two(4, 1024).ok(r):
                return f'resolutions that are powers of two in 4..1024 (got {r!r})'
            if self.rule.problem(x):
                return f'{self.text} (got {x!r} at {r}x{r})'
        return ''


def clean(cfg, rules):
    """cfg with each value as its rule cleans it (paths expanded); keys without a rule unchanged."""
    return {k: rules[k].clean(v) if k in rules else v for k, v in cfg.items()}


def check(cfg, rules):
    """Stop with one line at the first value in cfg that breaks its rule (every key must have one)."""
    for key, value in cfg.items():
        if key not in rules:
            raise KeyError(f'no rule for {key!r}: add it to the script\'s RULES')
        expected = rules[key].problem(value)
        if expected:
            raise SystemExit(f'error: --{key}={value!r} is not valid; expected {expected}')
