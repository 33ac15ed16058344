"""Train a distiller (or a teacher) from a config.

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--cfg-options k=v ...]
    torchrun --nproc_per_node=2 tools/train.py CONFIG --launcher pytorch

With no CONFIG the embedded default, projects/cosim/toy2d.py, runs. ``teacher.X=v`` in
--cfg-options is short for ``model.teacher.X=v``. The config is checked before anything is
built (a misspelled key fails with the closest right one). Options for long runs (see
docs/reliability.md): ``fsdp=True`` (shard the trained networks, with --launcher pytorch),
``mixed_precision=bf16`` (CUDA only), ``optim_wrapper.<network>.accumulative_counts=k`` (each
update over k micro-batches of the batch), ``model.nonfinite_patience=K``,
``dist_timeout=SECONDS`` (how long a collective waits for a hung peer; 300 on CPU, NCCL's own on
GPUs). --resume restarts exactly where the last readable checkpoint left off; checkpoints are
read with ``torch.load(weights_only=True)`` and checked against their digest.

A user error (a misspelt or out-of-range key, a missing or refused file) is one line on stderr
and exit status 2; ``--debug`` (or ``GDISTILL_DEBUG=1``) shows the traceback instead. mmengine's
environment and config dump goes to the log file; ``--print-env`` shows it on the terminal too.
"""
import argparse
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # run from a checkout

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402

import gdistill.data  # noqa: E402,F401  (registers everything a config may name)
import gdistill.distillers  # noqa: E402,F401
import gdistill.engine  # noqa: E402,F401
import gdistill.metrics  # noqa: E402,F401
import gdistill.networks  # noqa: E402,F401
from gdistill.engine.cli import run  # noqa: E402
from gdistill.engine.config_check import check_config  # noqa: E402
from gdistill.engine.runner import build_runner, expand_aliases, setup_cpu_distributed  # noqa: E402

DEFAULT_CONFIG = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'projects', 'cosim', 'toy2d.py')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('config', nargs='?', default=DEFAULT_CONFIG, help='config file (default: %(default)s)')
    p.add_argument('--work-dir', help='where logs, checkpoints and results go (default: work_dirs/<config name>)')
    p.add_argument('--resume', nargs='?', const='auto', default=None,
                   help='resume from the latest checkpoint of the work dir, or from the given one')
    p.add_argument('--cfg-options', nargs='+', action=DictAction, default={},
                   help='override config keys, e.g. model.divergence.coef=0.75 train_cfg.max_iters=500')
    p.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    p.add_argument('--local-rank', '--local_rank', type=int, default=0)
    p.add_argument('--print-env', action='store_true',
                   help="also print mmengine's environment, config and hook dump (always in the log file)")
    p.add_argument('--debug', action='store_true', help='show the full traceback of every error')
    return p.parse_args(argv)


def load_config(config, work_dir=None, cfg_options=None, resume=None, launcher='none'):
    if not osp.isfile(config):
        raise FileNotFoundError(f'config file {config!r} does not exist')
    cfg = Config.fromfile(config)
    options = expand_aliases(cfg_options)
    if options:
        cfg.merge_from_dict(options)
    cfg.launcher = launcher
    cfg.work_dir = work_dir or cfg.get('work_dir') or osp.join('work_dirs', osp.splitext(osp.basename(config))[0])
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume is not None:
        cfg.resume, cfg.load_from = True, resume
    return cfg


def main(argv=None):
    args = parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    cfg = load_config(args.config, args.work_dir, args.cfg_options, args.resume, args.launcher)
    if args.print_env:
        cfg.print_env = True
    check_config(cfg)  # keys and values, before anything is set up
    if cfg.get('torch_threads'):
        torch.set_num_threads(int(cfg.torch_threads))
    setup_cpu_distributed(cfg, args.launcher)
    runner = build_runner(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    run(main)
