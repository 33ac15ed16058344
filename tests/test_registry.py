"""Tests of gdistill.registry: helpful errors for unknown or missing types, the registry tree
under mmengine's, and the runner's conversion of mmengine's unknown-type errors."""
import pytest
import torch
from mmengine.registry import DefaultScope
from mmengine.registry import HOOKS as MM_HOOKS
from mmengine.registry import MODELS as MM_MODELS

import gdistill.networks  # noqa: F401  (registers MLPDenoiser and the EDM networks)
import gdistill.schedules  # noqa: F401
from gdistill import registry as R
from gdistill.engine import runner as gd_runner
from gdistill.networks.mlp import MLPDenoiser
from gdistill.registry import MODELS, SCHEDULES, UnknownTypeError, build
from gdistill.schedules import EDMSchedule, VESchedule

SCHEDULE_NAMES = ['CosineSchedule', 'EDMSchedule', 'TrigFlowSchedule', 'VESchedule', 'VPSchedule']



def test_unknown_type_names_closest_match_and_known_list():
    with pytest.raises(UnknownTypeError) as info:
        SCHEDULES.build(dict(type='EDMSchedul'))
    msg = str(info.value)
    assert msg == ("'EDMSchedul' is not a registered schedule in scope 'gdistill'. "
                   "Did you mean 'EDMSchedule'? Known: " + ', '.join(SCHEDULE_NAMES) + '.')
    # a KeyError, so code catching mmengine's KeyErrors still catches it
    assert isinstance(info.value, KeyError)


def test_unknown_type_closest_match_is_the_nearest_one():
    with pytest.raises(UnknownTypeError, match=r"Did you mean 'VPSchedule'\?"):
        SCHEDULES.build(dict(type='VPSchedle'))
    with pytest.raises(UnknownTypeError, match=r"Did you mean 'TrigFlowSchedule'\?"):
        SCHEDULES.build(dict(type='TrigflowSchedule'))


def test_unknown_type_without_close_match_has_no_hint():
    with pytest.raises(UnknownTypeError) as info:
        SCHEDULES.build(dict(type='Zzzzzzzz'))
    msg = str(info.value)
    assert 'Did you mean' not in msg
    assert msg.endswith('Known: ' + ', '.join(SCHEDULE_NAMES) + '.')


def test_missing_type_key_lists_known_types():
    with pytest.raises(KeyError) as info:
        SCHEDULES.build(dict(sigma_min=0.1, sigma_max=1.0))
    assert not isinstance(info.value, UnknownTypeError)
    msg = info.value.args[0]
    assert msg == ('a schedule config needs a "type" key; got keys [\'sigma_max\', \'sigma_min\']. '
                   'Known schedule types: ' + ', '.join(SCHEDULE_NAMES) + '.')


def test_build_passes_objects_through_and_applies_kwargs():
    sched = EDMSchedule()
    assert build(SCHEDULES, sched) is sched
    assert build(SCHEDULES, None) is None
    ve = build(SCHEDULES, dict(type='VESchedule'), sigma_max=10.0)
    assert isinstance(ve, VESchedule) and ve.sigma_max == 10.0
    # the config's own values beat the defaults
    ve = build(SCHEDULES, dict(type='VESchedule', sigma_max=20.0), sigma_max=10.0)
    assert ve.sigma_max == 20.0


def test_models_is_a_child_of_mmengine_models():
    assert MODELS.parent is MM_MODELS
    assert MODELS.scope == 'gdistill'
    assert MM_MODELS._children['gdistill'] is MODELS
    assert R.NETWORKS is MODELS
    assert R.HOOKS.parent is MM_HOOKS
    # gdistill's own kinds are roots
    assert SCHEDULES.parent is None and SCHEDULES.scope == 'gdistill'
    assert MODELS.get('MLPDenoiser') is MLPDenoiser


def test_mmengine_root_finds_gdistill_models_by_scope():
    net = MM_MODELS.build(dict(type='gdistill.MLPDenoiser', dim=3, hidden=8, depth=1, emb_dim=4))
    assert isinstance(net, MLPDenoiser) and net.dim == 3


def test_unknown_model_lists_gdistill_models():
    with pytest.raises(UnknownTypeError) as info:
        MODELS.build(dict(type='MLPDenoisr'))
    msg = str(info.value)
    assert msg.startswith("'MLPDenoisr' is not a registered model in scope 'gdistill'. "
                          "Did you mean 'MLPDenoiser'? Known: ")
    known = msg.split('Known: ', 1)[1].rstrip('.').split(', ')
    own = sorted(MODELS.module_dict)
    assert known[:len(own)] == own  # the child's own names first, sorted
    assert set(MM_MODELS.module_dict) <= set(known)  # then its ancestors'
    assert len(known) == len(set(known))


def test_explain_lists_gdistill_models():
    msg = gd_runner._explain('Foo', 'gdistill', 'model')
    assert msg.startswith("'Foo' is not a registered model in scope 'gdistill'.")
    assert 'Did you mean' not in msg
    known = msg.split('Known: ', 1)[1].rstrip('.').split(', ')
    assert 'MLPDenoiser' in known
    assert set(MODELS.module_dict) <= set(known)
    # close to a gdistill name → a hint
    assert "Did you mean 'MLPDenoiser'?" in gd_runner._explain('MLPDenoser', 'gdistill', 'model')


def test_explain_prefers_the_named_scope_and_handles_unknown_registries():
    msg = gd_runner._explain('Foo', 'mmengine', 'model')
    assert "in scope 'mmengine'" in msg
    assert 'MLPDenoiser' not in msg  # the root does not list its children's names
    assert gd_runner._explain('Foo', 'gdistill', 'no such kind') == "'Foo' is not a registered no such kind"


def test_build_runner_converts_mmengine_unknown_type_errors(monkeypatch):
    """mmengine's own KeyError (raised here by the real build under scope gdistill) becomes an
    UnknownTypeError that lists gdistill's models."""
    def from_cfg(cfg):
        with DefaultScope.overwrite_default_scope('gdistill'):
            return MM_MODELS.build(dict(type='MLPDenoisr'))

    monkeypatch.setattr(gd_runner.GdRunner, 'from_cfg', staticmethod(from_cfg))
    with pytest.raises(UnknownTypeError) as info:
        gd_runner.build_runner({})
    msg = str(info.value)
    assert "'MLPDenoisr' is not a registered model in scope 'gdistill'" in msg
    assert "Did you mean 'MLPDenoiser'?" in msg
    assert isinstance(info.value.__cause__, KeyError)


def test_build_runner_leaves_other_key_errors_alone(monkeypatch):
    def from_cfg(cfg):
        raise KeyError('something else')

    monkeypatch.setattr(gd_runner.GdRunner, 'from_cfg', staticmethod(from_cfg))
    with pytest.raises(KeyError) as info:
        gd_runner.build_runner({})
    assert not isinstance(info.value, UnknownTypeError)
    assert info.value.args == ('something else',)


def test_every_mmengine_registry_has_a_gdistill_child_so_builds_are_quiet(tmp_path):
    """Under default_scope='gdistill' mmengine looks for a gdistill registry in every tree it
    builds from (optimizers, optimiser wrappers, visualisation backends, …) and warns when
    there is none; each has an empty child, which builds what its parent holds."""
    import logging
    import mmengine.optim  # noqa: F401  (registers torch's optimisers)
    import mmengine.visualization  # noqa: F401
    import mmengine.registry as mm
    from mmengine.logging import MMLogger
    roots = [getattr(mm, n) for n in dir(mm) if n.isupper() and isinstance(getattr(mm, n), mm.Registry)]
    assert all('gdistill' in r.children for r in roots if r.parent is None)
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    keep = Keep(level=logging.WARNING)
    logger.addHandler(keep)
    try:
        with DefaultScope.overwrite_default_scope('gdistill'):
            opt = mm.OPTIMIZERS.build(dict(type='Adam', params=[torch.nn.Parameter(torch.zeros(1))], lr=1e-3))
            wrapper = mm.OPTIM_WRAPPERS.build(dict(type='OptimWrapper', optimizer=opt))
            sched = mm.PARAM_SCHEDULERS.build(dict(type='ConstantLR', optimizer=wrapper, factor=1.0))
            backend = mm.VISBACKENDS.build(dict(type='LocalVisBackend', save_dir=str(tmp_path)))
    finally:
        logger.removeHandler(keep)
    assert isinstance(opt, torch.optim.Adam) and type(wrapper).__name__ == 'OptimWrapper'
    assert type(sched).__name__ == 'ConstantLR' and type(backend).__name__ == 'LocalVisBackend'
    assert not [m for m in messages if 'Failed to search registry' in m], messages
    assert R.OPTIMIZERS.parent is mm.OPTIMIZERS and R.OPTIMIZERS.scope == 'gdistill'


def test_no_unused_file_client_is_built(tmp_path):
    """mmengine's checkpoint code builds a FileClient (and logs its deprecation warning) even
    without file_client_args; inside ``unused_file_client`` it does not, and it still does with
    them."""
    import logging
    from mmengine.fileio import FileClient
    from mmengine.logging import MMLogger
    from gdistill.engine.hooks import unused_file_client
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())
    logger = MMLogger.get_current_instance()
    keep = Keep(level=logging.WARNING)
    logger.addHandler(keep)
    original = FileClient.__dict__['infer_client']
    try:
        with unused_file_client():
            assert FileClient.infer_client(None, str(tmp_path)) is None
        assert not messages, messages
        with unused_file_client():
            assert isinstance(FileClient.infer_client(dict(backend='disk'), str(tmp_path)), FileClient)
        assert FileClient.__dict__['infer_client'] is original
        assert isinstance(FileClient.infer_client(None, str(tmp_path)), FileClient)
        assert any('"FileClient" will be deprecated' in m for m in messages)   # what it avoids
    finally:
        logger.removeHandler(keep)
