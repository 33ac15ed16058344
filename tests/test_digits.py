"""The digits benchmark's pieces: the dataset and its split, the classifier tool and its
detector, the image metrics on real digits, seeded multi-process evaluation, and the teacher
loaded from a DenoisingTrainer checkpoint."""
import os
import os.path as osp
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import gdistill.data  # noqa: F401
import gdistill.engine  # noqa: F401
import gdistill.metrics  # noqa: F401
import gdistill.networks  # noqa: F401
from gdistill.data.digits import DigitsDataset, load_digits_split
from gdistill.engine.image_eval import evaluate_images, evaluate_sampler, latents, shard_batches
from gdistill.metrics.detectors import NetworkDetector, images_to_uint8
from gdistill.metrics.frechet import FeatureStats
from gdistill.metrics.image import ImageEvaluator
from gdistill.registry import DATASETS, SAMPLERS

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'tools'))
pytest.importorskip('sklearn')


# --- the dataset -----------------------------------------------------------------------------
def rows(images):
    return sorted(map(bytes, images.reshape(len(images), -1).numpy()))


def test_split_is_a_stratified_partition():
    x_all, y_all = load_digits_split('all')
    x_tr, y_tr = load_digits_split('train')
    x_ho, y_ho = load_digits_split('held_out')
    assert x_all.shape == (1797, 1, 8, 8) and x_all.dtype == torch.uint8
    assert len(y_tr) == 1347 and len(y_ho) == 450
    # per class, round(¼ · count) held out; the two parts together are the whole set
    for c in range(10):
        n = int((y_all == c).sum())
        assert int((y_ho == c).sum()) == round(0.25 * n) and int((y_tr == c).sum()) == n - round(0.25 * n)
    both = torch.cat([x_tr, x_ho])
    assert rows(both) == rows(x_all)
    assert torch.equal(torch.cat([y_tr, y_ho]).bincount(), y_all.bincount())
    # pixel values 0…16 scaled to 0…255; another seed gives another split
    assert int(x_all.min()) == 0 and int(x_all.max()) == 255
    assert set(np.unique(x_all.numpy()).tolist()) == {round(v * 255 / 16) for v in range(17)}
    assert not torch.equal(load_digits_split('held_out', seed=1)[1], y_ho)


def test_dataset_items():
    ds = DATASETS.build(dict(type='DigitsDataset', split='held_out'))
    item = ds[3]
    assert item['img'].shape == (1, 8, 8) and item['img'].dtype == torch.uint8
    assert item['label'].shape == (10,) and item['label'].sum() == 1 and item['idx'] == 3
    assert int(item['label'].argmax()) == int(ds.labels[3])
    assert ds.image_shape == (1, 8, 8) and ds.label_dim == 10
    assert DigitsDataset(use_labels=False)[0]['label'].numel() == 0
    with pytest.raises(ValueError, match='split'):
        DigitsDataset(split='test')
    with pytest.raises(IndexError):
        ds[450]


# --- the classifier and its detector ---------------------------------------------------------
@pytest.fixture(scope='module')
def digits_files(tmp_path_factory):
    """A classifier trained briefly by the tool, and reference statistics of the training split."""
    import train_digit_classifier as tool
    d = tmp_path_factory.mktemp('digits')
    torch.set_num_threads(1)
    ckpt = tool.train(str(d / 'classifier.pth'), epochs=3)
    det = NetworkDetector(checkpoint=str(d / 'classifier.pth'))
    x, _ = load_digits_split('train')
    with torch.no_grad():
        feats = det(x)
    stats = FeatureStats().update(feats)
    stats.save(d / 'ref.npz')
    np.savez(d / 'ref_features.npz', mu=stats.mean, sigma=stats.cov, features=feats.numpy())
    return dict(dir=d, ckpt=ckpt, classifier=str(d / 'classifier.pth'), ref=str(d / 'ref.npz'),
                ref_features=str(d / 'ref_features.npz'))


def metrics(files, block_size=None):
    det = dict(type='NetworkDetector', checkpoint=files['classifier'])
    return [dict(type='FrechetDistance', name='fd', detector=det, reference=files['ref'], block_size=block_size),
            dict(type='PrecisionRecall', detector=det, reference=files['ref_features']),
            dict(type='LabelAccuracy', classifier=dict(det, method='forward'))]


def test_classifier_checkpoint_and_detector(digits_files):
    ckpt = torch.load(digits_files['classifier'], weights_only=True)  # plain tensors and containers
    assert ckpt['network']['type'] == 'DigitClassifier' and ckpt['meta']['epochs'] == 3
    assert ckpt['meta']['held_out_accuracy'] > 0.8  # three epochs already separate the digits
    feats = NetworkDetector(checkpoint=digits_files['classifier'])
    logits = NetworkDetector(checkpoint=digits_files['classifier'], method='forward')
    x, y = load_digits_split('held_out')
    with torch.no_grad():
        f, z = feats(x), logits(x)
    assert f.shape == (450, 64) and z.shape == (450, 10)
    # the logits are the last layer applied to the features: the features are the penultimate layer
    assert torch.allclose(z, feats.network.head(f), atol=1e-5)
    assert float((z.argmax(1) == y).double().mean()) == pytest.approx(ckpt['meta']['held_out_accuracy'])
    with pytest.raises(ValueError, match='no method'):
        NetworkDetector(checkpoint=digits_files['classifier'], method='logits')


def test_metrics_of_real_digits(digits_files):
    ev = ImageEvaluator(metrics(digits_files, block_size=450))
    train = evaluate_images(DigitsDataset('train'), ev, batch_size=200)
    # the training split against its own statistics: FD 0, every point on the other manifold
    assert abs(train['fd']) < 1e-6 and train['pr_precision'] == 1.0 and train['pr_recall'] == 1.0
    assert train['label_accuracy'] == pytest.approx(digits_files['ckpt']['meta']['train_accuracy'])
    # blocks [0, 450) and [450, 900) (the rest is not a full block)
    x, _ = load_digits_split('train')
    det = NetworkDetector(checkpoint=digits_files['classifier'])
    mu, sigma = np.load(digits_files['ref'])['mu'], np.load(digits_files['ref'])['sigma']
    with torch.no_grad():  # (float32 features of other batchings differ in the last bits)
        fds = [FeatureStats().update(det(x[i:i + 450])).frechet_distance(mu, sigma) for i in (0, 450)]
    assert train['fd_block_mean'] == pytest.approx(np.mean(fds), rel=1e-5)
    assert train['fd_block_std'] == pytest.approx(np.std(fds, ddof=1), rel=1e-5)
    held = evaluate_images(DigitsDataset('held_out'), ev, batch_size=200)
    assert held['fd'] > 1.0 and 0.5 < held['pr_precision'] < 1.0   # unseen digits: a positive floor


def test_label_accuracy_of_samples_file(digits_files, tmp_path):
    import train_digit_classifier as tool
    x, y = load_digits_split('held_out')
    samples = x.float() / 127.5 - 1
    np.savez(tmp_path / 's.npz', samples=samples.numpy(), labels=y.numpy())
    acc = tool.check_samples(digits_files['classifier'], str(tmp_path / 's.npz'))
    assert acc == pytest.approx(digits_files['ckpt']['meta']['held_out_accuracy'])
    # images_to_uint8 inverts the [−1, 1] scaling of uint8 images exactly
    assert torch.equal(images_to_uint8(samples), x)
    np.savez(tmp_path / 'bad.npz', samples=samples.numpy(), labels=y[:3].numpy())
    with pytest.raises(ValueError, match='labels'):
        tool.check_samples(digits_files['classifier'], str(tmp_path / 'bad.npz'))


# --- seeded, shared-out evaluation --------------------------------------------------------------
class ToyDenoiser(torch.nn.Module):
    """A fixed 'denoiser' whose samples depend on the label: a bright bar at the label's row."""

    def forward(self, x, sigma, labels=None):
        base = torch.tanh(x / (1 + sigma.reshape(-1, 1, 1, 1)))
        bar = torch.zeros_like(x)
        if labels is not None:
            rows = labels.argmax(1) % 8
            bar[torch.arange(len(x)), 0, rows] = 1.5
        return (0.3 * base + bar - 0.5).clamp(-1, 1)


def run_evaluation(files, sampler, batch_size, num=60):
    ev = ImageEvaluator(metrics(files, block_size=20))
    results, kept = evaluate_sampler(ToyDenoiser(), build_sampler(sampler), ev, num, batch_size, (1, 8, 8), 10,
                                     seed=3, keep=num)
    return results, kept


def build_sampler(cfg):
    return SAMPLERS.build(cfg)


STOCHASTIC = dict(type='MultistepSampler', num_steps=3)
DETERMINISTIC = dict(type='EDMHeunSampler', num_steps=3)


def _eval_worker(rank, init_file, files, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        results, kept = run_evaluation(files, STOCHASTIC, batch_size=10)
        torch.save(dict(results=results, kept=kept), f'{out}.{rank}')
    finally:
        torch.distributed.destroy_process_group()


def test_latents_and_shards_are_per_sample():
    a = latents([3, 4, 5], (1, 8, 8), seed=2)
    assert torch.equal(latents([5], (1, 8, 8), seed=2)[0], a[2])
    assert not torch.equal(latents([5], (1, 8, 8), seed=3)[0], a[2])
    shards = [shard_batches(23, 5, r, 3) for r in range(3)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(23))
    assert shards[1] == [[5, 6, 7, 8, 9], [20, 21, 22]]  # blocks 1 and 4 of 5


def test_evaluation_is_reproducible_and_batch_independent(digits_files):
    one, kept = run_evaluation(digits_files, STOCHASTIC, batch_size=10)
    assert kept.shape == (60, 1, 8, 8)
    assert 0.0 <= one['label_accuracy'] <= 1.0 and one['fd'] > 0
    again, kept_again = run_evaluation(digits_files, STOCHASTIC, batch_size=10)
    assert again == one and torch.equal(kept, kept_again)       # fixed seeds: reproducible
    # a deterministic sampler gives the same samples at any batch size
    det_a, kept_a = run_evaluation(digits_files, DETERMINISTIC, batch_size=10)
    det_b, kept_b = run_evaluation(digits_files, DETERMINISTIC, batch_size=7)
    assert torch.equal(kept_a, kept_b) and det_a['label_accuracy'] == det_b['label_accuracy']
    assert det_a['fd'] == pytest.approx(det_b['fd'], rel=1e-9)


@pytest.mark.slow
def test_evaluation_on_two_processes_equals_one(digits_files, tmp_path):
    one, kept = run_evaluation(digits_files, STOCHASTIC, batch_size=10)
    # two processes, each drawing its share of the batches
    mp.start_processes(_eval_worker, args=(str(tmp_path / 'init'), digits_files, str(tmp_path / 'out')),
                       nprocs=2, start_method='spawn')
    for rank in (0, 1):
        r = torch.load(f'{tmp_path / "out"}.{rank}', weights_only=False)['results']
        assert r.keys() == one.keys()
        for k in one:
            assert r[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k
    # rank 0 drew batches 0, 2, 4: its kept samples are those of the one-process run
    kept0 = torch.load(f'{tmp_path / "out"}.0', weights_only=False)['kept']
    assert torch.equal(kept0, torch.cat([kept[0:10], kept[20:30], kept[40:50]]))


# --- the teacher from a DenoisingTrainer checkpoint ---------------------------------------------
class Payload:
    """An object whose unpickling would run code (create a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


TINY_NET = dict(type='EDMPrecond', img_resolution=8, img_channels=1, label_dim=10, model_type='SongUNet',
                model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0.0)


def test_edm_teacher_reads_the_ema_of_a_training_checkpoint(tmp_path):
    from gdistill.registry import MODELS
    from gdistill.teachers.edm import EDMTeacher
    torch.manual_seed(0)
    net, ema = MODELS.build(TINY_NET), MODELS.build(TINY_NET)
    state = {**{f'network.{k}': v for k, v in net.state_dict().items()},
             **{f'network_ema.{k}': v for k, v in ema.state_dict().items()}, 'images_seen': torch.tensor(5.0)}
    marker = tmp_path / 'code_ran'
    # a file whose pickle would run code is refused, and nothing of it runs
    torch.save(dict(meta=dict(iter=3), state_dict=state, message_hub=Payload(str(marker))), tmp_path / 'evil.pth')
    from gdistill.engine.checkpoint import UnsafeCheckpointError, write_checkpoint
    with pytest.raises(UnsafeCheckpointError, match=r'evil\.pth: refused'):
        EDMTeacher(network=TINY_NET, checkpoint=str(tmp_path / 'evil.pth'))
    assert not marker.exists()
    # a checkpoint as the runner writes it (mmengine's log history and numpy states in plain form)
    from mmengine.logging import HistoryBuffer
    write_checkpoint(dict(meta=dict(iter=3, note=np.arange(3)), state_dict=state,
                          message_hub=dict(log_scalars={'loss': HistoryBuffer([0.5], [1])})), tmp_path / 'iter_3.pth')
    torch.load(tmp_path / 'iter_3.pth', weights_only=True)  # torch's safe default reads it
    teacher = EDMTeacher(network=TINY_NET, checkpoint=str(tmp_path / 'iter_3.pth'))
    for k, v in ema.state_dict().items():
        assert torch.equal(teacher.network.state_dict()[k], v), k
    raw = EDMTeacher(network=TINY_NET, checkpoint=str(tmp_path / 'iter_3.pth'), checkpoint_prefix='network.')
    assert torch.equal(raw.network.model.map_label.weight, net.model.map_label.weight)
    assert not torch.equal(raw.network.model.map_label.weight, ema.model.map_label.weight)
    with pytest.raises(KeyError, match='generator.'):
        EDMTeacher(network=TINY_NET, checkpoint=str(tmp_path / 'iter_3.pth'), checkpoint_prefix='generator.')
    assert not marker.exists()


# --- the whole benchmark through the tools, in miniature --------------------------------------
def tool(args, cwd, timeout=400):
    import subprocess
    out = subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_digits_pipeline_through_the_tools(tmp_path, digits_files, monkeypatch):
    import json
    import shutil
    # the configs' relative paths (work_dirs/fd_digits/..., work_dirs/edm_digits/...) resolve in tmp_path
    os.makedirs(tmp_path / 'work_dirs' / 'fd_digits')
    shutil.copy(digits_files['classifier'], tmp_path / 'work_dirs' / 'fd_digits' / 'classifier.pth')
    shutil.copy(digits_files['ref_features'], tmp_path / 'work_dirs' / 'fd_digits' / 'ref_train.npz')
    small = ['model_channels=16']
    train, ev = osp.join(ROOT, 'tools', 'train.py'), osp.join(ROOT, 'tools', 'eval.py')
    tool([train, osp.join(ROOT, 'configs', 'teachers', 'edm_digits.py'), '--cfg-options', 'train_cfg.max_iters=3',
          'train_dataloader.batch_size=8', 'model.network.' + small[0], 'default_hooks.checkpoint.interval=3',
          'param_scheduler.0.end=1', 'param_scheduler.1.begin=1', 'param_scheduler.1.end=3',
          'custom_hooks.2.interval=3', 'custom_hooks.2.num_samples=4', 'model.sampler.num_steps=2'], tmp_path)
    teacher_ckpt = 'work_dirs/edm_digits/iter_3.pth'
    hook = 'custom_hooks.3.'
    tool([train, osp.join(ROOT, 'projects', 'cosim', 'digits.py'), '--cfg-options', 'train_cfg.max_iters=2',
          'train_dataloader.batch_size=8', f'teacher.checkpoint={teacher_ckpt}', 'teacher.network.' + small[0],
          'default_hooks.checkpoint.interval=2', 'custom_hooks.2.interval=2', 'custom_hooks.2.num_samples=4',
          'model.regression.num_pairs=16',
          hook + 'num_samples=20', hook + 'batch_size=10', hook + 'interval=2', hook + 'interval_samples=10',
          hook + 'grid=4'], tmp_path)
    work = tmp_path / 'work_dirs' / 'digits'
    report = json.load(open(work / 'metrics.json'))
    rows = report['rows']
    assert [(r['name'], r['nfe']) for r in rows] == [('CoSIM', 4), ('CoSIM', 2), ('CoSIM', 1), ('teacher Heun', 35),
                                                     ('teacher Heun', 3), ('teacher Euler', 4)]
    for r in rows:
        assert r['num_samples'] == 20 and np.isfinite(r['fd_digits']) and 0 <= r['label_accuracy'] <= 1
        assert 0 <= r['pr_precision'] <= 1 and 0 <= r['pr_recall'] <= 1
    assert [h['iter'] for h in report['history']] == [2]
    assert len(list((tmp_path / 'work_dirs' / 'pairs').glob('teacher_pairs_*.pt'))) == 1  # the regression's pool
    assert (work / 'samples_final.png').stat().st_size > 500
    # tools/eval.py reproduces the hook's figures: same seeds, same batches
    out = tool([ev, 'gen', osp.join(ROOT, 'projects', 'cosim', 'digits.py'), str(work / 'iter_2.pth'), '--steps', '4',
                '--num-samples', '20', '--batch', '10', '--cfg-options', f'teacher.checkpoint={teacher_ckpt}',
                'teacher.network.' + small[0]], tmp_path)
    gen = json.loads(out.strip().splitlines()[-1])
    assert gen['nfe'] == 4 and gen['source'] == 'student'
    for k in ('fd_digits', 'pr_precision', 'pr_recall', 'label_accuracy'):
        assert gen[k] == pytest.approx(rows[0][k], rel=1e-9), k
    # reference statistics of real images, and the floor (in this process: cheaper than a tool run)
    import importlib
    eval_tool = importlib.import_module('eval')  # tools/eval.py
    monkeypatch.chdir(tmp_path)
    ref = eval_tool.main(['ref', '--dataset', 'digits:held_out', '--detector',
                          'network:work_dirs/fd_digits/classifier.pth', '--out', 'ref_ho.npz', '--max-items', '100'])
    assert ref['n'] == 100
    with np.load(tmp_path / 'ref_ho.npz') as f:
        assert f['mu'].shape == (64,) and f['sigma'].shape == (64, 64) and int(f['n']) == 100
    raw = eval_tool.main(['gen', osp.join(ROOT, 'projects', 'cosim', 'digits.py'), str(work / 'iter_2.pth'),
                          '--steps', '4', '--num-samples', '20', '--batch', '10', '--no-ema', '--cfg-options',
                          f'teacher.checkpoint={teacher_ckpt}', 'teacher.network.' + small[0]])
    assert raw['source'] == 'student_raw' and np.isfinite(raw['fd_digits'])
    floor = eval_tool.main(['data', osp.join(ROOT, 'projects', 'cosim', 'digits.py'), '--dataset', 'digits:train',
                            '--batch', '700'])
    assert abs(floor['fd_digits']) < 1e-6 and floor['num_samples'] == 1347 and floor['pr_recall'] == 1.0
