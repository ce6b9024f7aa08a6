"""launch/: the 3-fold aggregation, and that the shell scripts at least parse."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write(path: pathlib.Path, payload: dict) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload))
  return path


def test_aggregate_folds_mean_and_std(tmp_path):
  files = [_write(tmp_path / f'train{i}/eval/fold{i}.json', {'f1_d': v, 'bpq': 2 * v, 'name': 'x', 'per_image': []})
           for i, v in enumerate([0.7, 0.8, 0.9], start=1)]
  out = subprocess.run([sys.executable, 'launch/aggregate_folds.py', '--json', *map(str, files)], cwd=REPO,
                       capture_output=True, text=True, check=True)
  table = json.loads(out.stdout)
  assert set(table) == {'f1_d', 'bpq'}
  assert table['f1_d']['mean'] == pytest.approx(0.8)
  assert table['f1_d']['std'] == pytest.approx((2 * 0.01 / 3) ** 0.5)
  assert table['bpq']['n'] == 3


def test_aggregate_folds_names_a_bad_file(tmp_path):
  bad = tmp_path / 'fold1.json'
  bad.write_text('{not json')
  out = subprocess.run([sys.executable, 'launch/aggregate_folds.py', str(bad)], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode != 0 and str(bad) in out.stderr


@pytest.mark.parametrize('script', ['pannuke_3fold.sh', 'slurm_multinode.sbatch', 'tpu_vm.sh'])
def test_launch_scripts_parse(script):
  subprocess.run(['bash', '-n', str(REPO / 'launch' / script)], check=True)
