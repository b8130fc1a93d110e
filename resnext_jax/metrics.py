"""Metrics to `workdir/metrics.jsonl` (one JSON object per line) and TensorBoard event files.

Only the writing process (process 0) touches files. On resume, lines from steps after the
restored checkpoint are dropped, so the file reads as if the run had never stopped.
"""
import json

from etils import epath


class MetricsWriter:

    def __init__(self, workdir, *, enabled=True, resume_step=0):
        self.enabled = enabled
        self.path = epath.Path(workdir) / 'metrics.jsonl'
        self.lines = []
        self._tb = None
        if not enabled:
            return
        if self.path.exists():
            self.lines = [l for l in self.path.read_text().splitlines()
                          if l.strip() and json.loads(l)['step'] <= resume_step]
        self.path.write_text(''.join(l + '\n' for l in self.lines))
        import tensorflow as tf  # noqa: PLC0415 (TensorFlow only where files are written)
        self._tf = tf
        self._tb = tf.summary.create_file_writer(str(epath.Path(workdir) / 'tensorboard'))

    def write(self, step, split, **values):
        """Appends {'step', 'split', **values}; numbers go to TensorBoard as `split/name`."""
        if not self.enabled:
            return
        record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in values.items()}}
        self.lines.append(json.dumps(record))
        if self.path.as_posix().startswith('gs://'):   # object stores cannot append
            self.path.write_text(''.join(l + '\n' for l in self.lines))
        else:
            with self.path.open('a') as f:
                f.write(self.lines[-1] + '\n')
        # Scalars as plain Summary protos: TensorBoard reads them, and writing needs no tensorboard.
        Value = self._tf.compat.v1.Summary.Value
        summary = self._tf.compat.v1.Summary(value=[
            Value(tag=f'{split}/{k}', simple_value=v) for k, v in record.items()
            if k not in ('step', 'split') and isinstance(v, (int, float))])
        with self._tb.as_default():
            self._tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=int(step))
        self._tb.flush()

    def records(self):
        return [json.loads(l) for l in self.lines]


def _plain(v):
    if hasattr(v, 'item'):
        v = v.item()
    return v
