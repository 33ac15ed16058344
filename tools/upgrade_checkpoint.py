"""Convert checkpoints written before gdistill's plain checkpoint format, once.

    python tools/upgrade_checkpoint.py work_dirs/edm_digits/iter_5000.pth [MORE.pth ...] [--no-backup]

Earlier checkpoints pickle mmengine's ``HistoryBuffer`` (log history) and numpy arrays (numpy's
random state), which ``torch.load(weights_only=True)`` refuses, and gdistill reads checkpoints
with nothing else. This reads such a file with an unpickler that resolves only torch's tensor
rebuilders, ``OrderedDict``, numpy's array/dtype/scalar rebuilders, ``HistoryBuffer`` and its
statistics (``gdistill.engine.checkpoint.read_legacy_checkpoint``) and refuses any other global,
so nothing from the file runs; then writes it back in the plain format with its digest. The
original is kept as ``FILE.legacy`` unless ``--no-backup``. Weights, optimiser state, random
states and log history are unchanged (the test compares them).
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from gdistill.engine.checkpoint import (UnsafeCheckpointError, read_checkpoint, read_legacy_checkpoint,  # noqa: E402
                                        write_checkpoint)


def upgrade(path, backup=True):
    """Rewrite ``path`` in the plain format; returns False when it already was."""
    try:
        read_checkpoint(path, verify=False)
        return False
    except UnsafeCheckpointError:
        pass
    data = read_legacy_checkpoint(path)
    tmp = osp.join(osp.dirname(osp.abspath(path)), f'.{osp.basename(path)}.tmp')
    write_checkpoint(data, tmp)
    read_checkpoint(tmp)  # reads back under weights_only=True, digest checked
    if backup:
        os.replace(path, path + '.legacy')
    os.replace(tmp, path)
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('checkpoints', nargs='+')
    p.add_argument('--no-backup', action='store_true', help='do not keep the original as FILE.legacy')
    args = p.parse_args(argv)
    for path in args.checkpoints:
        done = upgrade(path, backup=not args.no_backup)
        print(f'{path}: ' + ('converted' + ('' if args.no_backup else f' (original kept as {path}.legacy)')
                             if done else 'already in the plain format'))


if __name__ == '__main__':
    from gdistill.engine.cli import run  # one line and exit 2 for a user error; --debug: traceback
    run(main)
