"""Runs the code cells of launch/colab_quickstart.ipynb on tiny settings, without Jupyter.

The notebook's JSON is parsed, IPython shell/magic lines (`!cmd`, `%cd`) become no-ops, the cell tagged
`parameters` is followed by the test's overrides, and every code cell is exec'd in one namespace.
"""

import json
import os
import pathlib
import re
import sys

import pytest

from child_env import SHARED_CACHE, child_env

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'launch' / 'colab_quickstart.ipynb'


def code_cells(path: pathlib.Path) -> list[tuple[list[str], str]]:
  nb = json.loads(path.read_text())
  assert nb['nbformat'] == 4
  cells = []
  for cell in nb['cells']:
    if cell['cell_type'] != 'code':
      continue
    source = ''.join(cell['source'])
    source = re.sub(r'^(\s*)[!%].*$', r'\1pass', source, flags=re.MULTILINE)
    cells.append((cell.get('metadata', {}).get('tags', []), source))
  return cells


def run_notebook(overrides: dict) -> dict:
  namespace: dict = {'__name__': '__notebook__'}
  for tags, source in code_cells(NOTEBOOK):
    exec(compile(source, str(NOTEBOOK), 'exec'), namespace)  # pylint: disable=exec-used
    if 'parameters' in tags:
      namespace.update(overrides)
  return namespace


@pytest.fixture
def notebook_env(tmp_path, monkeypatch):
  """Child processes get the CLI children's environment (child_env.py: the checkout importable, one CPU device,
  the persistent XLA cache of tests/test_predict.py)."""
  monkeypatch.chdir(tmp_path)
  for name, value in child_env(**SHARED_CACHE).items():
    monkeypatch.setenv(name, value)
  if str(REPO) not in sys.path:
    monkeypatch.syspath_prepend(str(REPO))
  return tmp_path


def test_notebook_structure():
  cells = code_cells(NOTEBOOK)
  assert sum('parameters' in tags for tags, _ in cells) == 1
  text = '\n'.join(src for _, src in cells)
  for needle in ('dualunet_jax.train', 'configs/demo.py', 'dualunet_jax.predict', '_overlay.png', 'Segmenter'):
    assert needle in text


def test_notebook_predicts_with_tiny_settings(notebook_env):
  """Install cell (no-op here), demo tile, predict with a random tiny model of the demo config, overlay."""
  ns = run_notebook({'TRAIN': False, 'CONFIG': str(REPO / 'configs' / 'demo.py'), 'DEMO_SIZE': 160,
                     'TILE_SIZE': 128, 'OVERLAP': 32, 'OUTPUT': str(notebook_env / 'out')})
  assert ns['overlay'].size == (160, 160)
  assert ns['composition']['total'] >= 0
  assert (notebook_env / 'out' / 'demo_tile.geojson').is_file()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('DUALUNET_SLOW_TESTS') != '1',
                    reason='trains for a few steps (~1-2 min on 2 CPU cores); set DUALUNET_SLOW_TESTS=1')
def test_notebook_trains_then_predicts(notebook_env):
  ns = run_notebook({
      'CONFIG': str(REPO / 'configs' / 'demo.py'), 'WORKDIR': str(notebook_env / 'w'), 'DEMO_SIZE': 160,
      'TILE_SIZE': 128, 'OVERLAP': 32, 'OUTPUT': str(notebook_env / 'out'), 'TRAIN_FLAGS': ['--max_steps=2'],
      'CONFIG_FLAGS': [f'--config.dataset.data_dir={notebook_env / "tfds"}',
                       '--config.dataset.synthetic_train_size=8', '--config.dataset.synthetic_test_size=2',
                       '--config.train.batch_size=2', '--config.eval.batch_size=2',
                       '--config.eval.max_val_images=2', '--config.train.steps_per_epoch=2',
                       '--config.train.epochs=1', '--config.train.eval_every_epochs=1']})
  assert ns['overlay'].size == (160, 160)
  assert ns['result'].instance_map.shape == (160, 160)  # the in-memory Segmenter cell
