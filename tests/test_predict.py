"""The `dualunet_jax.predict` CLI end to end with a real (tiny, untrained) checkpointed model."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from child_env import SHARED_CACHE, child_env

REPO = pathlib.Path(__file__).resolve().parents[1]


def subprocess_env() -> dict:
  """Environment for child processes: the repo importable, one CPU device, and a persistent XLA cache shared by
  the test runs (`.data/`, git-ignored): the cold start of a child is dominated by compiling the eager init
  ops of the model (~40 s on a busy 2-core box), which the cache turns into ~4 s on later runs."""
  return child_env(**SHARED_CACHE)


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'dualunet_jax.predict', *args], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=timeout)


def tiny_checkpoint(workdir: pathlib.Path) -> pathlib.Path:
  """A width-1/8 checkpoint with random weights, without running the (slow, eager) initialisers: the model is
  built abstractly and its parameters filled from numpy."""
  from configs import default
  from dualunet_jax import checkpointing, models
  config = default.get_config()
  config.model.width_multiplier = 1 / 8
  model = models.fill_random(models.abstract_model(config.model, config.dataset.num_classes))
  return checkpointing.save_model_checkpoint(workdir, config, model)


def test_expand_inputs(tmp_path):
  from dualunet_jax.inference import engine
  for name in ('b.png', 'a.jpg', 'skip.txt'):
    (tmp_path / name).write_bytes(b'x')
  specs = engine.expand_inputs([str(tmp_path), str(tmp_path / '*.png')], ['0.25', '0.5'])
  assert [(s.path.name, s.mpp) for s in specs] == [('a.jpg', 0.25), ('b.png', 0.25), ('b.png', 0.5)]
  with pytest.raises(ValueError, match='no file matches'):
    engine.expand_inputs([str(tmp_path / '*.svs')], [])
  with pytest.raises(ValueError, match='--mpp has 2 values for 1'):
    engine.expand_inputs([str(tmp_path)], ['1', '2'])


def test_cli_with_tiny_checkpoint(tmp_path):
  workdir = tiny_checkpoint(tmp_path / 'w')

  rng = np.random.default_rng(0)
  (tmp_path / 'in').mkdir()
  Image.fromarray(rng.integers(0, 256, (150, 260, 3), dtype=np.uint8)).save(tmp_path / 'in' / 'a.png')
  Image.fromarray(rng.integers(0, 256, (200, 100, 3), dtype=np.uint8)).save(tmp_path / 'in' / 'b.jpg')
  out = tmp_path / 'out'
  proc = _cli(f'--workdir={workdir}', f'--input={tmp_path / "in"}', f'--output={out}', '--mpp=0.5',
              '--tile_size=128', '--overlap=32', '--batch_size=2', '--workers=1', '--noprogress',
              '--formats=geojson,csv,maps,composition')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'a: ' in proc.stdout and 'b: ' in proc.stdout
  for name, shape in (('a', (150, 260)), ('b', (200, 100))):
    assert np.load(out / f'{name}_instances.npy').shape == shape
    assert np.load(out / f'{name}_classes.npy').shape == shape
    fc = json.loads((out / f'{name}.geojson').read_text())
    assert fc['type'] == 'FeatureCollection'
    comp = json.loads((out / f'{name}_composition.json').read_text())
    assert len(fc['features']) == comp['total'] == len((out / f'{name}.csv').read_text().splitlines()) - 1
  assert (out / 'composition.csv').is_file()

  no_stats = _cli(f'--workdir={workdir}', f'--input={tmp_path / "in"}', f'--output={out}', '--stain_norm=reinhard')
  assert no_stats.returncode == 2  # a converted/random checkpoint has no training statistics: say so, one line
  assert no_stats.stderr.strip().splitlines()[-1].startswith('dualunet-predict: error: ')
  assert 'stain_stats.json' in no_stats.stderr

  bad = _cli(f'--workdir={workdir}', f'--input={tmp_path / "nothing" / "*.svs"}', f'--output={out}')
  assert bad.returncode == 2
  lines = bad.stderr.strip().splitlines()
  assert lines[-1].startswith('dualunet-predict: error: ') and 'nothing/*.svs: no file matches' in lines[-1]
