"""The two-stage enhancement stage: EnhancementNet, foreground replacement per method, frozen stage 2, a tiny
two-stage run, pixel metrics, self-contained refinement workdirs."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dualunet_jax import checkpointing, methods, models, refinement
from dualunet_jax.data import synthetic
from dualunet_jax.models.refine import EnhancementNet


def _params(module) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _config(mode: str = 'stage2', lr: float = 1e-3) -> ml_collections.ConfigDict:
  """A tiny U-Net stage 1 and the paper's EnhancementNet; lr 1e-3 (the paper's 1e-4 needs more steps)."""
  return ml_collections.ConfigDict({
      'method': 'unet', 'dataset': {'num_classes': 1, 'class_names': ('nucleus',)},
      'model': {'width_multiplier': 0.125, 'batch_norm': True, 'dtype': 'float32'},
      'postprocess': {'fg_threshold': 0.5, 'split': False, 'split_min_distance': 3, 'relabel_connectivity': 1},
      'train': {'learning_rate': lr, 'batch_size': 4, 'base_batch_size': 4, 'weight_decay': 0.0,
                'lr_milestones': (), 'lr_gamma': 0.1},
      'refine': {'mode': mode, 'init_workdir': '', 'init_checkpoint': 'best', 'stage1_workdir': '',
                 'features': 64, 'num_convs': 3, 'stage1_loss_weight': 1.0}})


def _state(module) -> dict:
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))


def _random_enhancer() -> EnhancementNet:
  return models.fill_random(nnx.eval_shape(lambda r: EnhancementNet(rngs=r), nnx.Rngs(0)))


def _two_stage(stage1_split, mode: str) -> refinement.TwoStage:
  return refinement.TwoStage(nnx.merge(*stage1_split), _random_enhancer(), method_name='unet',
                             freeze_stage1=mode == 'stage2')


def _stepper(model, config):
  """(step(n) -> metrics of the last of n steps, the model after them)."""
  optimizer = refinement.make_optimizer(model, config, steps_per_epoch=1)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(functools.partial(refinement.train_step, graphdef, method=refinement.method_for(config),
                                   class_weights=None, config=config))
  holder = {'state': state}

  def run(n, batch):
    for _ in range(n):
      holder['state'], metrics = step(holder['state'], batch)
    return metrics, nnx.merge(graphdef, holder['state'])[0]

  return run


@pytest.fixture(scope='module')
def weak_stage1():
  """A deliberately weak stage 1 (a tiny U-Net with BatchNorm and random He-normal weights: stage-1 training
  is tested in test_binary_methods.py, and its compilation would double this file's time) and 4 synthetic
  48x48 training tiles."""
  records = synthetic.make_records(4, seed=3, size=48, num_classes=1)
  inst = np.stack([r['instance_map'] for r in records])
  batch = {'image': jnp.asarray(np.stack([r['image'] for r in records])), 'instance_map': jnp.asarray(inst),
           'class_map': jnp.asarray((inst > 0).astype(np.int32))}
  model = models.fill_random(methods.get('unet').abstract_model(_config(), 1), seed=1)
  return nnx.split(model), batch


# ----------------------------------------------------------------------------------------------- model

def test_enhancement_net_parameters_and_shapes():
  assert _params(nnx.eval_shape(lambda r: EnhancementNet(rngs=r), nnx.Rngs(0))) == 76_289
  net = _random_enhancer()
  images = np.random.default_rng(0).integers(0, 256, (2, 12, 10, 3)).astype(np.uint8)
  fg = np.random.default_rng(1).random((2, 12, 10), np.float32)
  logits = net(jnp.asarray(images), jnp.asarray(fg))
  assert logits.shape == (2, 12, 10) and logits.dtype == jnp.float32
  # uint8 and the same image scaled to [0, 1] are one input; a [B, H, W, 1] foreground is accepted too.
  np.testing.assert_allclose(net(jnp.asarray(images / 255.0), jnp.asarray(fg[..., None])), logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------- maps

def test_refine_maps_dualunet_mask_is_refined_and_classes_kept():
  rng = np.random.default_rng(0)
  for k in (1, 2, 4):
    probs = jax.nn.softmax(jnp.asarray(rng.normal(0, 2, (3, 16, 16, k + 1)), jnp.float32), axis=-1)
    r = rng.random((3, 16, 16)).astype(np.float32)
    r[np.abs(r - 0.5) < 1e-4] = 0.25  # float32 rounding at exactly 0.5 is out of scope
    maps = {'class_probs': probs, 'density': jnp.zeros((3, 16, 16, 1))}
    np.testing.assert_allclose(refinement.foreground_of('dualunet', maps), 1 - probs[..., 0], atol=1e-7)
    out = jax.jit(functools.partial(refinement.refine_maps, 'dualunet'))(maps, jnp.asarray(r))
    q, p = np.asarray(out['class_probs']), np.asarray(probs)
    np.testing.assert_array_equal(out['density'], maps['density'])
    np.testing.assert_array_equal(refinement.foreground_mask('dualunet', out), r > 0.5)
    np.testing.assert_array_equal(q[..., 1:].argmax(-1), p[..., 1:].argmax(-1))  # nucleus class kept
    np.testing.assert_allclose(q.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(q[..., 1:] / q[..., 1:].sum(-1, keepdims=True),
                               p[..., 1:] / p[..., 1:].sum(-1, keepdims=True), atol=1e-5)
    if k == 1:  # one class: exactly (1 - r, r)
      np.testing.assert_allclose(q[..., 0], 1 - r, atol=1e-6)
  # The docstring's case where background = 1 - r with kept proportions would lose the nucleus.
  q = refinement.rescale_class_probs(jnp.asarray([0.2, 0.4, 0.4]), jnp.asarray(0.6))
  assert int(q.argmax()) > 0


def test_refine_maps_binary_and_hovernet():
  rng = np.random.default_rng(1)
  r = jnp.asarray(rng.random((2, 8, 8)), jnp.float32)
  p = jnp.asarray(rng.random((2, 8, 8)), jnp.float32)
  binary = methods.get('unet').maps(jnp.log(p / (1 - p))[..., None])
  np.testing.assert_allclose(refinement.foreground_of('unet', binary), p, atol=1e-5)
  out = refinement.refine_maps('unet', binary, r)
  np.testing.assert_allclose(out['fg'][..., 0], r)
  np.testing.assert_allclose(out['class_probs'], np.stack([1 - r, r], -1), atol=1e-7)
  np.testing.assert_array_equal(refinement.foreground_mask('unet', out), r > 0.5)
  for np_map in (p[..., None], jnp.stack([1 - p, p], -1)):  # NP as a probability or a 2-way softmax
    maps = {'np': np_map, 'hv': jnp.zeros((2, 8, 8, 2)), 'class_probs': jnp.zeros((2, 8, 8, 3))}
    np.testing.assert_allclose(refinement.foreground_of('hovernet', maps), p, atol=1e-6)
    out = refinement.refine_maps('hovernet', maps, r)
    assert out['np'].shape == np_map.shape and out['hv'] is maps['hv'] and out['class_probs'] is maps['class_probs']
    np.testing.assert_allclose(refinement.foreground_of('hovernet', out), r)


def test_refined_dualunet_maps_by_abstract_evaluation():
  # DualU-Net as stage 1: the wrapper's maps keep the density, rescale class_probs and carry the stage-1 copy.
  config = ml_collections.ConfigDict({
      'method': 'dualunet', 'refine': {'mode': 'stage2'},
      'model': {'encoder': 'resnext50_32x4d', 'width_multiplier': 0.125, 'cardinality': 1, 'dtype': 'float32'}})
  method = refinement.method_for(config)
  model = method.abstract_model(config, 4)
  assert set(method.parameter_counts(model)) == {'stage1', 'refine', 'total'}
  assert method.parameter_counts(model)['refine'] == 76_289
  maps = nnx.eval_shape(lambda m, x: method.maps(m(x)), model, jax.ShapeDtypeStruct((2, 40, 40, 3), jnp.uint8))
  assert set(maps) == set(method.map_kinds) == {'class_probs', 'density', 'stage1_class_probs'}
  assert maps['class_probs'].shape == maps['stage1_class_probs'].shape == (2, 40, 40, 5)


# ----------------------------------------------------------------------------------------------- metrics

def test_pixel_metrics_on_hand_made_masks():
  gt = np.zeros((4, 4), bool)
  gt[0, :4] = True  # 4 true pixels
  pred = np.zeros((4, 4), bool)
  pred[0, 2:4] = pred[1, 0] = True  # 3 predicted, 2 of them right
  m = refinement.pixel_metrics(pred, gt)
  assert m == pytest.approx({'precision': 2 / 3, 'recall': 2 / 4, 'dice': 4 / 7, 'iou': 2 / 5})
  # Pooled over tiles: a perfect empty-ish tile does not count as a 1.0 in an average.
  acc = refinement.PixelMetrics()
  acc.add(pred, gt)
  other = np.zeros((4, 4), bool)
  other[3, 3] = True
  acc.add(other, other)
  assert acc.result() == pytest.approx({'pixel_precision': 3 / 4, 'pixel_recall': 3 / 5, 'pixel_dice': 6 / 9,
                                        'pixel_iou': 3 / 6})
  assert all(math.isnan(v) for v in refinement.pixel_metrics(np.zeros(3, bool), np.zeros(3, bool)).values())


# ----------------------------------------------------------------------------------------------- training

def test_stage2_keeps_stage1_frozen_and_joint_trains_both(weak_stage1):
  stage1_split, batch = weak_stage1
  model = _two_stage(stage1_split, 'stage2')
  stage1_before, refine_before = _state(model.stage1), _state(model.refine)
  metrics, model = _stepper(model, _config('stage2'))(2, batch)
  assert np.isfinite(float(metrics['total'])) and set(metrics) >= {'refine_bce', 'total', 'grad_norm'}
  # Every stage-1 variable (parameters and BatchNorm statistics) is bit-for-bit unchanged ...
  jax.tree.map(np.testing.assert_array_equal, _state(model.stage1), stage1_before)
  # ... while every refinement parameter moved.
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), _state(model.refine), refine_before)
  assert all(jax.tree.leaves(moved))

  # Joint fine-tuning differentiates and optimises every parameter and adds the stage-1 loss (checked by
  # abstract evaluation: a joint step would compile the stage-1 backward pass again).
  config = _config('joint')
  joint = _two_stage(stage1_split, 'joint')
  method = refinement.method_for(config)
  adam_moments = lambda model, config: nnx.to_pure_dict(nnx.state(nnx.eval_shape(
      lambda m: refinement.make_optimizer(m, config, steps_per_epoch=1), model)))['opt_state'][1]['mu']
  assert set(adam_moments(joint, config)) == {'stage1', 'refine'}
  assert set(adam_moments(joint, _config('stage2'))) == {'refine'}  # no state, no decay for stage 1 in stage 2
  loss_fn = lambda m: method.loss(m(batch['image']), batch, None, config)
  (_, parts), grads = nnx.eval_shape(
      nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, refinement.trainable_filter(config)), has_aux=True),
      joint)
  assert {'refine_bce', 'stage1_bce', 'total'} <= set(parts)
  count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
  assert count(grads) == _params(joint) > _params(joint.refine)


@functools.partial(nnx.jit, static_argnums=0)
def _maps(method, model, images):
  return method.maps(model(images))


def _fg_dice(model, method, batch):
  model.eval()
  maps = _maps(method, model, batch['image'])
  gt = np.asarray(batch['instance_map']) > 0
  dice = lambda ms: refinement.pixel_metrics(np.asarray(refinement.foreground_mask('unet', ms)), gt)['dice']
  return dice(refinement.unrefined(maps)), dice(maps), maps


def test_tiny_two_stage_run_improves_weak_stage1(weak_stage1):
  stage1_split, batch = weak_stage1
  config = _config('stage2')
  method = refinement.method_for(config)
  _, model = _stepper(_two_stage(stage1_split, 'stage2'), config)(20, batch)
  stage1_dice, refined_dice, maps = _fg_dice(model, method, batch)
  print(f'foreground Dice on the training tiles: stage 1 {stage1_dice:.3f}, refined {refined_dice:.3f}')
  assert refined_dice >= stage1_dice and refined_dice > 0.5
  # The maps carry the stage-1 version of what was replaced; TTA kinds cover every map.
  assert set(maps) == set(method.map_kinds) == {'class_probs', 'fg', 'stage1_class_probs', 'stage1_fg'}
  stage1_maps = _maps(methods.get('unet'), model.stage1, batch['image'])
  for k, v in refinement.unrefined(maps).items():
    np.testing.assert_allclose(v, stage1_maps[k], atol=1e-6)


# ----------------------------------------------------------------------------------------------- workdirs

def test_refinement_workdir_is_self_contained(weak_stage1, tmp_path):
  import shutil
  stage1_split, batch = weak_stage1
  stage1_config = _config()
  del stage1_config['refine'], stage1_config['train']
  stage1_dir = checkpointing.save_model_checkpoint(tmp_path / 'stage1', stage1_config, nnx.merge(*stage1_split))
  # A stage-2 run: config sections of the stage-1 run, stage-1 weights copied in at initialisation.
  run = _config('stage2')
  run.refine.init_workdir = str(stage1_dir)
  run.model.width_multiplier = 1.0  # ignored: the model section comes from the stage-1 run
  config = refinement.resolve_config(run)
  assert config.model.width_multiplier == 0.125 and config.refine.stage1_workdir == str(stage1_dir)
  model = models.fill_random(refinement.method_for(config).abstract_model(config, 1))
  meta = refinement.initialise(model, config)
  assert meta['step'] == 0
  jax.tree.map(np.testing.assert_array_equal, _state(model.stage1), _state(nnx.merge(*stage1_split)))
  workdir = refinement.save_two_stage(tmp_path / 'refine', config, model, step=7)
  model.eval()
  expected = _maps(refinement.method_for(config), model, batch['image'])
  shutil.rmtree(stage1_dir)  # the refinement workdir needs nothing outside itself
  restored, restored_config = refinement.restore_for_inference(workdir)
  assert refinement.is_two_stage(restored_config) and restored.freeze_stage1
  got = _maps(refinement.method_for(restored_config), restored, batch['image'])
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], atol=1e-6)
