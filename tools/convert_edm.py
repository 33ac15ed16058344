"""Convert an official EDM pickle into a plain state_dict and a gdistill config.

    python tools/convert_edm.py edm-cifar10-32x32-cond-vp.pkl work_dirs/edm-cifar10-cond-vp

writes, into OUT_DIR:

- ``state_dict.pt``: the network's weights (``torch.save`` of a plain state_dict; read back
  with ``torch.load(..., weights_only=True)``);
- ``network.json``: the MODELS config that rebuilds the network (recorded constructor
  arguments), plus ``num_params`` and the source file name;
- ``teacher.py``: an mmengine config that defines ``edm_teacher = dict(type='EDMTeacher',
  network=..., checkpoint='{{ fileDirname }}/state_dict.pt')``. The weights are found beside the
  config wherever the folder is moved (mmengine replaces ``{{ fileDirname }}`` with the folder of
  the file when it reads it); no absolute path is written. Use it as a base of a method config::

      # my_run.py
      _base_ = ['projects/cosim/cifar10.py', 'work_dirs/edm-cifar10-cond-vp/teacher.py']
      model = dict(teacher=dict(_delete_=True, **_base_.edm_teacher))

  (``_base_`` paths are relative to ``my_run.py``.) Without converting,
  ``--cfg-options teacher.path=edm-….pkl teacher.network=None`` reads the pickle directly.

The pickle is read with gdistill's safe loader: no code from the file is executed. Official
pickles record their classes by bare name (``'EDMPrecond'``, persistence version 6); see
``gdistill.teachers.edm_pickle``.
"""
import argparse
import json
import os
import os.path as osp
import sys

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

from gdistill.teachers.edm_pickle import (network_config, network_from_record,  # noqa: E402
                                          read_edm_pickle)


def _py(value):
    """``value`` as Python source (``repr``, except that inf/nan become float(...))."""
    if isinstance(value, float) and (value != value or value in (float('inf'), float('-inf'))):
        return f'float({str(value)!r})'
    if isinstance(value, dict):
        return '{' + ', '.join(f'{k!r}: {_py(v)}' for k, v in value.items()) + '}'
    if isinstance(value, (list, tuple)):
        inner = ', '.join(_py(v) for v in value)
        if isinstance(value, list):
            return f'[{inner}]'
        return f'({inner},)' if len(value) == 1 else f'({inner})'
    return repr(value)


TEACHER_CONFIG = """\
# Converted from {source} (key {key!r}, {num_params:,} parameters) by tools/convert_edm.py.
# The weights are state_dict.pt beside this file; mmengine replaces {{{{ fileDirname }}}} with this
# file's folder when it reads the config. Use it as a base of a method config, e.g.
#   _base_ = ['projects/cosim/cifar10.py', 'path/to/this/teacher.py']
#   model = dict(teacher=dict(_delete_=True, **_base_.edm_teacher))
edm_teacher = dict(
    type='EDMTeacher',
    network={network},
    checkpoint='{{{{ fileDirname }}}}/state_dict.pt')
"""


def convert(pickle_path, out_dir, key='ema'):
    """Write state_dict.pt, network.json and teacher.py for ``key`` of ``pickle_path`` into
    ``out_dir``; returns the network config."""
    data = read_edm_pickle(pickle_path)
    if isinstance(data, dict):
        if key not in data:
            raise SystemExit(f'{pickle_path}: no {key!r} entry; it has {sorted(map(str, data))}')
        record = data[key]
    else:
        record = data
    config = network_config(record)
    net = network_from_record(record)
    os.makedirs(out_dir, exist_ok=True)
    weights = osp.join(out_dir, 'state_dict.pt')
    torch.save(net.state_dict(), weights)
    num_params = sum(p.numel() for p in net.parameters())
    with open(osp.join(out_dir, 'network.json'), 'w') as f:
        json.dump(dict(network=config, num_params=num_params,
                       source=osp.basename(pickle_path), key=key), f, indent=2)
        f.write('\n')
    with open(osp.join(out_dir, 'teacher.py'), 'w') as f:
        f.write(TEACHER_CONFIG.format(source=osp.basename(pickle_path), key=key,
                                      network=_py(config), num_params=num_params))
    return config, num_params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('pickle', help='an EDM network pickle (edm-*.pkl or a snapshot)')
    parser.add_argument('out_dir', help='folder for state_dict.pt, network.json, teacher.py')
    parser.add_argument('--key', default='ema', help="which network of the pickle (default 'ema')")
    args = parser.parse_args(argv)
    config, num_params = convert(args.pickle, args.out_dir, args.key)
    print(f'{config["type"]} with {num_params:,} parameters -> {args.out_dir}')


if __name__ == '__main__':
    from gdistill.engine.cli import run  # one line and exit 2 for a user error; --debug: traceback
    run(main)
