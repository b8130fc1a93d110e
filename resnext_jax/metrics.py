"""Metrics to `workdir/metrics.jsonl` (one JSON object per line) and TensorBoard event files.

Only the writing process (process 0) touches files. On resume, lines from steps after the
restored checkpoint are dropped, so the file reads as if the run had never stopped. A record
replaces an earlier one of the same step and split (a finished run that is evaluated again,
e.g. at another test size, keeps one eval line per step). A last line cut short by a killed
process is dropped with a warning; any other unreadable line stops the run (`ValueError`).
"""
import json
import os

from absl import logging
from etils import epath


class MetricsWriter:

    def __init__(self, workdir, *, enabled=True, resume_step=0):
        self.enabled = enabled
        self.path = epath.Path(workdir) / 'metrics.jsonl'
        self._lines = {}   # (step, split) → JSON line, in the order first written
        self._tb = None
        if not enabled:
            return
        text = self.path.read_text() if self.path.exists() else ''
        records = read_lines(text, self.path)
        for record, line in records:
            if record['step'] <= resume_step:
                self._lines[record['step'], record['split']] = line
        if ''.join(l + '\n' for l in self._lines.values()) != text:  # dropped or merged lines
            self._rewrite()
        import tensorflow as tf  # noqa: PLC0415 (TensorFlow only where files are written)
        self._tf = tf
        self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / 'tensorboard'))

    @property
    def lines(self):
        return list(self._lines.values())

    def write(self, step, split, **values):
        """Writes {'step', 'split', **values}, replacing a record of the same step and split;
        numbers go to TensorBoard as `split/name`."""
        if not self.enabled:
            return
        record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in values.items()}}
        key, line = (record['step'], split), json.dumps(record)
        replaces = key in self._lines
        self._lines[key] = line
        if replaces or self.path.as_posix().startswith('gs://'):  # object stores cannot append
            self._rewrite()
        else:
            with self.path.open('a') as f:
                f.write(line + '\n')
        # Scalars as plain Summary protos: TensorBoard reads them, and writing needs no tensorboard.
        Value = self._tf.compat.v1.Summary.Value
        summary = self._tf.compat.v1.Summary(value=[
            Value(tag=f'{split}/{k}', simple_value=v) for k, v in record.items()
            if k not in ('step', 'split') and isinstance(v, (int, float))])
        with self._tb.as_default():
            self._tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=int(step))
        self._tb.flush()

    def records(self):
        return [json.loads(l) for l in self._lines.values()]

    def _rewrite(self):
        """The whole file from `_lines`; locally through a temporary file and a rename, so a
        process killed meanwhile leaves the old file or the new one, never a part."""
        text = ''.join(l + '\n' for l in self._lines.values())
        if self.path.as_posix().startswith('gs://'):   # an object is replaced whole anyway
            self.path.write_text(text)
            return
        tmp = self.path.with_name(self.path.name + '.tmp')
        tmp.write_text(text)
        os.replace(tmp, self.path)


def read_lines(text, path='metrics.jsonl'):
    """[(record, line)] of a metrics.jsonl text; an unparsable last line (a write cut short)
    is left out with a warning, an unparsable line before it raises ValueError."""
    lines = [(n, l) for n, l in enumerate(text.splitlines(), 1) if l.strip()]
    out = []
    for n, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {'step', 'split'} <= record.keys():
                raise ValueError('not a record with step and split')
        except ValueError as e:
            if n == lines[-1][0]:
                logging.warning('%s: dropping its unreadable last line %d (%s), the end of a '
                                'write cut short', path, n, e)
                break
            raise ValueError(f'{path} line {n} is not a metrics record ({e}); delete or repair '
                             'that line and run again') from None
        out.append((record, line))
    return out


def _plain(v):
    if hasattr(v, 'item'):
        v = v.item()
    return v
