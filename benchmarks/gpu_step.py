"""gdistill's ImageNet-64 training step, network call and sampling on one GPU, old and new paths
side by side in one run, with the ratios the speed goals are stated in (docs/benchmarks.md).

    python benchmarks/gpu_step.py --out work_dirs/gpu_step            # on a CUDA machine (~6 min)
    python benchmarks/gpu_step.py --dry --out work_dirs/gpu_step_dry   # every code path on the CPU, tiny net

Sections (``--sections``, default all, each stops starting work at ``--budget`` seconds):

- ``network``: one call of the ImageNet-64 ADM (EDMPrecond around DhariwalUNet, 296 M parameters)
  at batch 32 — no-grad forward and forward+backward in fp32 (TF32 on), under bf16 autocast op
  by op (``autocast_mode='ops'``, the path before) and with the whole network in bf16
  (``'cast'``), with and without channels-last; and sCM's JVP tangent as a multiple of a no-grad
  forward of F, through the written-out layer derivatives and through torch's built-in rules;
- ``train``: ``train_step`` of ``projects/cosim/imagenet64.py``, ``configs/sid/imagenet64.py``
  and ``configs/scm/imagenet64_scd.py`` (batch 32, random weights), fp32 and bf16
  (``mixed_precision='bf16'``), plus the variants ``bf16-cl`` (channels-last) and
  ``bf16-deferred`` (fused Adam, ``nonfinite_check='deferred'``: no host read in the step);
  ms/step, img/s, peak GiB, network calls per step;
- ``sampling``: the student's multistep sampler at NFE 1/2/4, batch 256, fp32 and bf16
  (``in_precision``), with and without channels-last.

Results: ``OUT/gpu_step.json`` (rewritten after every measurement) and the printed table and
ratios. The official SiD loop is not run here: compare against it with the same batch and GPU.
"""
import argparse
import contextlib
import copy
import json
import os
import os.path as osp
import statistics
import sys
import time

import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools'))

CONFIGS = dict(cosim='projects/cosim/imagenet64.py', sid='configs/sid/imagenet64.py',
               scd='configs/scm/imagenet64_scd.py')
TINY = dict(img_resolution=16, model_channels=16, channel_mult=[1, 2], label_dim=10, num_blocks=1,
            attn_resolutions=[8])


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device('cpu' if args.dry or not torch.cuda.is_available() else 'cuda')
        self.cuda = self.device.type == 'cuda'
        self.deadline = time.time() + args.budget
        self.warmup, self.timed = (1, 1) if args.dry else (args.warmup, args.timed)
        if args.dry:
            args.batch, args.sample_batch = 4, 8
        self.out = args.out
        self.results = {}
        if args.dry:
            torch.set_num_threads(1)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = args.cudnn_benchmark

    # --- bookkeeping ---------------------------------------------------------------------------
    def save(self, keys, value):
        node = self.results
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        os.makedirs(self.out, exist_ok=True)
        tmp = osp.join(self.out, 'gpu_step.json.tmp')
        with open(tmp, 'w') as f:
            json.dump(self.results, f, indent=1, default=str)
        os.replace(tmp, osp.join(self.out, 'gpu_step.json'))

    def left(self):
        return self.deadline - time.time()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time_it(self, fn, warmup=None, timed=None):
        """Median ms of ``fn`` over timed calls after warm-up ones, and peak GiB over the timed."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(self.timed if timed is None else timed):
            if self.left() < 0:
                break
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None
        return dict(ms=round(statistics.median(times) * 1e3, 2) if times else None, n=len(times),
                    peak_gib=None if peak is None else round(peak, 2))

    # --- building --------------------------------------------------------------------------------
    def config(self, method, extra=None):
        from train import load_config
        base = load_config(osp.join(ROOT, CONFIGS[method]))
        trained = [k for k in base.optim_wrapper if k not in ('constructor', 'paramwise_cfg')]
        options = {f'optim_wrapper.{n}.accumulative_counts': 1 for n in trained}
        if self.args.dry:
            options.update({f'model.teacher.network.{k}': v for k, v in TINY.items()})
        options.update(extra or {})
        return load_config(osp.join(ROOT, CONFIGS[method]), cfg_options=options)

    def build(self, fn):
        with torch.device(self.device) if self.cuda else contextlib.nullcontext():
            m = fn()
        return m.to(self.device)

    @contextlib.contextmanager
    def amp_allowed(self):
        """A dry run builds mmengine's AmpOptimWrapper on the CPU too (bf16 CPU autocast)."""
        if self.cuda:
            yield
            return
        from mmengine.optim.optimizer import amp_optimizer_wrapper as amp
        real = amp.is_cuda_available
        amp.is_cuda_available = lambda: True
        try:
            yield
        finally:
            amp.is_cuda_available = real

    # --- sections --------------------------------------------------------------------------------
    def network(self):
        from gdistill.distillers.consistency import tangent_terms
        from gdistill.networks.edm import layers as edm_layers
        from gdistill.networks.trigflow import TrigFlowStudent
        from gdistill.registry import MODELS
        import gdistill.networks  # noqa: F401
        cfg = self.config('scd')
        netcfg = dict(cfg.model.teacher.network)
        torch.manual_seed(0)
        net = self.build(lambda: MODELS.build(netcfg))
        student = self.build(lambda: TrigFlowStudent(copy.deepcopy(net), sigma_data=0.5)).train()
        n, res, k = self.args.batch, netcfg['img_resolution'], netcfg['label_dim']
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randn((n, 3, res, res), device=self.device, generator=g)
        sigma = torch.exp(torch.randn(n, device=self.device, generator=g) * 1.2 - 1.2)
        labels = torch.nn.functional.one_hot(torch.arange(n, device=self.device) % k, k).float()
        t = torch.rand(n, device=self.device, generator=g) * 1.4 + 0.1
        dxdt = torch.randn_like(x)
        self.save(['network', 'info'], dict(batch=n, network=netcfg, params_m=round(sum(
            p.numel() for p in net.parameters()) / 1e6, 2)))

        def variant(mode, channels_last):
            for m in (net, student.network):
                m.autocast_mode = 'ops' if mode == 'bf16-ops' else 'cast'
                m.set_channels_last(channels_last)
            return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=mode != 'fp32')

        def fwd():
            with torch.no_grad():
                net(x, sigma, labels)

        def fwdbwd():
            net(x, sigma, labels).square().mean().backward()
            net.zero_grad(set_to_none=True)

        def F_fwd():
            with torch.no_grad():
                student.F(x, t, labels)

        def jvp():
            tangent_terms(student, x, t, dxdt, 0.5, labels, seed=0, method='jvp')

        def jvp_builtin():
            with edm_layers.builtin_forward_ad():
                jvp()

        net.eval()
        rows = {}
        for mode in ('fp32', 'bf16-ops', 'bf16-cast'):
            for cl in (False, True):
                if self.left() < 20 or (cl and mode == 'bf16-ops'):
                    continue
                name = mode + ('-cl' if cl else '')
                with variant(mode, cl):
                    row = dict(fwd=self.time_it(fwd), fwdbwd=self.time_it(fwdbwd))
                    if mode != 'bf16-ops':
                        row.update(F_fwd=self.time_it(F_fwd), jvp=self.time_it(jvp))
                        row['jvp_over_F_fwd'] = _ratio(row['jvp'], row['F_fwd'])
                    if mode != 'bf16-ops' and not cl:   # torch's GroupNorm rule fails on channels-last input
                        row['jvp_builtin'] = self.time_it(jvp_builtin)
                        row['jvp_builtin_over_F_fwd'] = _ratio(row['jvp_builtin'], row['F_fwd'])
                rows[name] = row
                self.save(['network', name], row)
                print(f'[network] {name}: ' + ', '.join(f'{k} {v["ms"] if isinstance(v, dict) else v}' for k, v in row.items()),
                      flush=True)
        variant('fp32', False)

    def train(self):
        from analyze import NetworkCallRecorder
        from gdistill.engine.optim import MultiOptimWrapperConstructor
        from gdistill.engine.runner import apply_mixed_precision
        from gdistill.registry import MODELS
        import gdistill.data  # noqa: F401
        import gdistill.distillers  # noqa: F401
        import gdistill.engine  # noqa: F401
        import gdistill.networks  # noqa: F401
        n = self.args.batch
        for method in self.args.methods:
            for prec in self.args.precisions:
                if self.left() < 30:
                    print(f'[train] {method} {prec}: skipped (budget)', flush=True)
                    continue
                extra = {}
                if prec == 'bf16-deferred':
                    extra = {'model.nonfinite_check': 'deferred'}
                    base = self.config(method)
                    for name in base.optim_wrapper:
                        if name not in ('constructor', 'paramwise_cfg'):
                            extra[f'optim_wrapper.{name}.optimizer.fused'] = True
                cfg = self.config(method, extra)
                torch.manual_seed(0)
                model = self.build(lambda: MODELS.build(cfg.model))
                if prec == 'bf16-cl':
                    for m in model.modules():
                        if hasattr(m, 'set_channels_last'):
                            m.set_channels_last(True)
                cfg.mixed_precision = None if prec == 'fp32' else 'bf16'
                with self.amp_allowed():
                    used = apply_mixed_precision(cfg, cuda=True)
                    ow = dict(cfg.optim_wrapper)
                    ow.pop('constructor')
                    wrappers = MultiOptimWrapperConstructor(ow)(model)
                net = cfg.model.teacher.network
                k = net.label_dim
                data = dict(idx=list(range(n)), label=[torch.nn.functional.one_hot(torch.tensor(i % k), k).float()
                                                        for i in range(n)])
                if method == 'scd':
                    g = torch.Generator().manual_seed(0)
                    data['img'] = [torch.randint(0, 256, (3, net.img_resolution, net.img_resolution), dtype=torch.uint8,
                                                 generator=g) for _ in range(n)]
                row = dict(precision_used=used, **self.time_it(lambda: model.train_step(data, wrappers)))
                row['images_per_s'] = round(n / (row['ms'] / 1e3), 2) if row['ms'] else None
                with NetworkCallRecorder(model) as rec:
                    model.train_step(data, wrappers)
                row['network_calls'] = len(rec.calls)
                model.resolve_nonfinite()
                row['nonfinite_skips'] = model.nonfinite_guard.skipped
                self.save(['train', method, prec], row)
                print(f'[train] {method} {prec}: {row}', flush=True)
                del model, wrappers
                self.free()

    def sampling(self):
        from gdistill.networks.edm.precond import in_precision
        from gdistill.registry import SAMPLERS, TEACHERS, build
        import gdistill.samplers  # noqa: F401
        import gdistill.teachers  # noqa: F401
        cfg = self.config('cosim')
        torch.manual_seed(0)
        teacher = self.build(lambda: build(TEACHERS, cfg.model.teacher)).eval()
        student = copy.deepcopy(teacher.network).requires_grad_(False).eval()
        n = self.args.sample_batch
        k = teacher.label_dim
        g = torch.Generator(device=self.device).manual_seed(0)
        noise = torch.randn((n,) + tuple(teacher.data_shape), generator=g, device=self.device)
        labels = torch.nn.functional.one_hot(torch.arange(n, device=self.device) % k, k).float()
        for prec in ('fp32', 'bf16'):
            for cl in (False, True):
                student.set_channels_last(cl)
                for steps in (1, 2, 4):
                    if self.left() < 10:
                        continue
                    sampler = build(SAMPLERS, dict(type='MultistepSampler', num_steps=steps))
                    net = in_precision(student, prec, self.device)

                    def run():
                        with torch.no_grad():
                            sampler(net, noise, labels, generator=torch.Generator(device=self.device).manual_seed(0))
                    row = self.time_it(run, warmup=1, timed=3 if not self.args.dry else 1)
                    row['images_per_s'] = round(n / (row['ms'] / 1e3), 1) if row['ms'] else None
                    name = f'{prec}{"-cl" if cl else ""} NFE {steps}'
                    self.save(['sampling', name], row)
                    print(f'[sampling] batch {n} {name}: {row}', flush=True)
        student.set_channels_last(False)

    def free(self):
        import gc
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def summary(self):
        r = self.results
        net, train, samp = r.get('network', {}), r.get('train', {}), r.get('sampling', {})

        def ms(node, *keys):
            for key in keys:
                node = node.get(key, {}) if isinstance(node, dict) else {}
            return node.get('ms') if isinstance(node, dict) else None
        ratios = {
            'network fwd fp32 / bf16-cast (goal >= 1.8)': _div(ms(net, 'fp32', 'fwd'), ms(net, 'bf16-cast', 'fwd')),
            'network fwd fp32 / bf16-cast-cl': _div(ms(net, 'fp32', 'fwd'), ms(net, 'bf16-cast-cl', 'fwd')),
            'network fwd fp32 / bf16-ops (before)': _div(ms(net, 'fp32', 'fwd'), ms(net, 'bf16-ops', 'fwd')),
            'network fwd+bwd fp32 / bf16-cast': _div(ms(net, 'fp32', 'fwdbwd'), ms(net, 'bf16-cast', 'fwdbwd')),
            'JVP tangent / F forward, fp32 (goal <= 3)': net.get('fp32', {}).get('jvp_over_F_fwd'),
            'JVP tangent / F forward, fp32, built-in rules (before)': net.get('fp32', {}).get('jvp_builtin_over_F_fwd'),
            'JVP tangent / F forward, bf16-cast': net.get('bf16-cast', {}).get('jvp_over_F_fwd'),
            'sampling NFE 4 img/s bf16-cl / fp32 (goal >= 2)': _div(samp.get('bf16-cl NFE 4', {}).get('images_per_s'),
                                                                  samp.get('fp32 NFE 4', {}).get('images_per_s')),
            'sampling NFE 4 img/s bf16 / fp32': _div(samp.get('bf16 NFE 4', {}).get('images_per_s'),
                                                     samp.get('fp32 NFE 4', {}).get('images_per_s')),
        }
        for method in train:
            for prec in train[method]:
                if prec != 'fp32':
                    ratios[f'train {method} fp32 / {prec}'] = _div(ms(train, method, 'fp32'), ms(train, method, prec))
        self.save(['ratios'], ratios)
        print('| run | ms/step | img/s | peak GiB | network calls |\n|---|---|---|---|---|')
        for method, rows in train.items():
            for prec, row in rows.items():
                print(f"| {method} {prec} | {row.get('ms')} | {row.get('images_per_s')} | {row.get('peak_gib')} | "
                      f"{row.get('network_calls')} |")
        for name, v in ratios.items():
            print(f'RATIO {name}: {v}')


def _div(a, b):
    return round(a / b, 3) if a and b else None


def _ratio(a, b):
    return _div(a.get('ms'), b.get('ms'))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='work_dirs/gpu_step')
    p.add_argument('--dry', action='store_true', help='CPU, tiny network, one timed call each')
    p.add_argument('--sections', nargs='+', default=['network', 'train', 'sampling'],
                   choices=['network', 'train', 'sampling'])
    p.add_argument('--methods', nargs='+', default=['cosim', 'sid', 'scd'], choices=sorted(CONFIGS))
    p.add_argument('--precisions', nargs='+', default=['fp32', 'bf16', 'bf16-cl', 'bf16-deferred'],
                   choices=['fp32', 'bf16', 'bf16-cl', 'bf16-deferred'])
    p.add_argument('--batch', type=int, default=32)
    p.add_argument('--sample-batch', type=int, default=256)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--timed', type=int, default=5)
    p.add_argument('--budget', type=float, default=420, help='seconds after which no measurement starts')
    p.add_argument('--cudnn-benchmark', action='store_true')
    args = p.parse_args(argv)
    bench = Bench(args)
    print(f'device {bench.device}, torch {torch.__version__}, dry={args.dry}', flush=True)
    for section in args.sections:
        try:
            getattr(bench, section)()
        except Exception as err:  # noqa: BLE001  (one failing section must not lose the others)
            import traceback
            bench.save(['errors', section], f'{type(err).__name__}: {err}\n{traceback.format_exc()[-2000:]}')
            print(f'[{section}] FAILED {type(err).__name__}: {err}', flush=True)
        bench.free()
    bench.summary()
    return bench.results


if __name__ == '__main__':
    main()
