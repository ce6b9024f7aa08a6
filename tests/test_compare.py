"""`python -m dualunet_jax.compare`: one table from the JSON files eval wrote (tests/test_hovernet_e2e.py also
runs it on a workdir the eval CLI has just scored)."""

import json
import pathlib
import subprocess
import sys

import pytest

from dualunet_jax import compare

REPO = pathlib.Path(__file__).resolve().parents[1]


def _workdir(root: pathlib.Path, name: str, method: str, f1_d: float, classes: dict[str, float],
             paper_std: float | None = None) -> pathlib.Path:
  """A workdir as eval leaves it: eval/test.json (and eval/test_robustness.json from --robustness=paper)."""
  workdir = root / name
  (workdir / 'eval').mkdir(parents=True)
  metrics = {'f1_d': f1_d, 'precision_d': 0.7, 'recall_d': 0.6, 'dice': 0.75, 'aji': 0.39, 'bpq': 0.32,
             'mpq': 0.24, 'r2': 0.55, 'f1_c_mean': sum(classes.values()) / len(classes), 'checkpoint_step': 1000,
             'config': {'method': method, 'split': 'test'}, 'per_image': []}
  metrics.update({f'f1_c_{name}': value for name, value in classes.items()})
  (workdir / 'eval' / 'test.json').write_text(json.dumps(metrics))
  if paper_std is not None:
    robustness = {'checkpoint_step': 1000, 'levels': {},
                  'paper': {'f1_d_mean': f1_d - 0.01, 'f1_d_std': paper_std, 'dice_mean': 0.7, 'dice_std': 0.0}}
    (workdir / 'eval' / 'test_robustness.json').write_text(json.dumps(robustness))
  return workdir


def test_rows_columns_and_variance_ratio(tmp_path):
  a = _workdir(tmp_path, 'dual', 'dualunet', 0.673, {'other': 0.011, 'inflammatory': 0.55}, paper_std=0.01)
  b = _workdir(tmp_path, 'hover', 'hovernet', 0.7, {'inflammatory': 0.6, 'spindle': 0.43}, paper_std=0.02)
  c = _workdir(tmp_path, 'plain', 'conic', 0.5, {'other': 0.2})
  header, rows = compare.table([compare.load_run(str(p)) for p in (a, b, c)])
  assert header[:4] == ['run', 'method', 'step', 'F1d']
  # per-class columns: the union in first-seen order; a class a run lacks is '-'
  classes = [h for h in header if h.startswith('F1c ') and h != 'F1c mean']
  assert classes == ['F1c other', 'F1c inflammatory', 'F1c spindle']
  col = {h: i for i, h in enumerate(header)}
  assert [r[col['run']] for r in rows] == ['dual', 'hover', 'plain']
  assert rows[0][col['F1c other']] == '0.011' and rows[0][col['F1c spindle']] == '-'
  assert rows[1][col['F1d']] == '0.700' and rows[1][col['method']] == 'hovernet'
  assert rows[0][col['mPQ+']] == '-'  # not reported -> '-'
  # variance relative to the first row: (0.02 / 0.01)^2
  ratio = col['F1d variance vs dual']
  assert rows[0][ratio] == '1.00x' and rows[1][ratio] == '4.00x' and rows[2][ratio] == '-'
  assert rows[1][col['robust F1d (mean ± std)']] == '0.690 ± 0.020'
  markdown = compare.format_markdown(header, rows).splitlines()
  assert len(markdown) == 5 and markdown[1].count('---|') == len(header)


def test_labels_json_files_and_no_robustness_columns(tmp_path):
  a = _workdir(tmp_path, 'dual', 'dualunet', 0.673, {'other': 0.011})
  run = compare.load_run(f'CoNIC ensemble={a}/eval/test.json')
  assert run.label == 'CoNIC ensemble' and run.robustness is None
  header, rows = compare.table([run])
  assert not any('robust' in h for h in header) and rows[0][0] == 'CoNIC ensemble'


def test_clear_errors_name_the_file(tmp_path):
  with pytest.raises(compare.CompareError, match=r'empty: no eval/test.json'):
    (tmp_path / 'empty').mkdir()
    compare.load_run(str(tmp_path / 'empty'))
  bad = tmp_path / 'bad.json'
  bad.write_text('{"f1_d": ')
  with pytest.raises(compare.CompareError, match=r'bad.json: not valid JSON'):
    compare.load_run(str(bad))
  other = tmp_path / 'other.json'
  other.write_text('{"loss": 1.0}')
  with pytest.raises(compare.CompareError, match=r'other.json: no f1_d'):
    compare.load_run(str(other))
  with pytest.raises(compare.CompareError, match=r'missing.json: cannot read'):
    compare.load_run(str(tmp_path / 'missing.json'))


def test_cli_prints_the_table_and_fails_in_one_line(tmp_path):
  a = _workdir(tmp_path, 'dual', 'dualunet', 0.673, {'other': 0.011}, paper_std=0.01)
  out = subprocess.run([sys.executable, '-m', 'dualunet_jax.compare', str(a), '--markdown'], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines()[2].startswith('| dual | dualunet | 1000 | 0.673 |')
  out = subprocess.run([sys.executable, '-m', 'dualunet_jax.compare', str(tmp_path / 'nothing')], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'nothing' in out.stderr
