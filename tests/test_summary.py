"""Tests for the `python -m dualunet_jax.summary` CLI (tiny width so it stays a few seconds; the full-size
numbers are reported in the README/commit log and checked exactly by tests/test_models.py)."""

import json
import pathlib
import subprocess
import sys

import ml_collections

from dualunet_jax import summary

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_cli_json_last_line_has_params_and_gflops():
  cmd = [sys.executable, '-m', 'dualunet_jax.summary', '--config=configs/default.py',
         '--config.model.width_multiplier=0.125', '--num_classes=5', '--json']
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert {'params', 'gflops_256', 'gflops_1024', 'gmacs_256', 'gmacs_1024', 'params_per_part'} <= set(result)
  assert result['params'] == result['params_per_part']['total'] > 0
  # K + 1 = 6 outputs from 16 / 8 = 8 channels, 3x3, with bias.
  assert result['params_per_part']['class_head'] == 6 * 8 * 9 + 6
  assert result['gmacs_256'] == result['gflops_256'] / 2
  # Convolutions dominate: 16x the pixels is ~16x the FLOPs.
  assert 15 < result['gflops_1024'] / result['gflops_256'] < 17
  assert 'parameters' in proc.stdout and 'FLOPs/2' in proc.stdout


def test_summarize_and_table_in_process():
  config = ml_collections.ConfigDict({'model': {'encoder': 'convnext_tiny', 'width_multiplier': 0.125,
                                                'dtype': 'bfloat16'}})
  result = summary.summarize(config, 2, sizes=(64,))
  assert result['method'] == 'dualunet'
  assert set(result['params_per_part']) == {'encoder', 'class_decoder', 'density_decoder', 'class_head',
                                             'density_head', 'total'}
  assert result['gflops_64'] > 0
  table = summary.format_table(result)
  assert '64x64' in table and 'total' in table


def test_table_flags_a_regrouped_resnext():
  model = {'encoder': 'resnext50_32x4d', 'width_multiplier': 0.125, 'dtype': 'float32', 'cardinality': 1}
  dense = summary.summarize(ml_collections.ConfigDict({'model': model}), 3, sizes=(64,))
  grouped = summary.summarize(ml_collections.ConfigDict({'model': dict(model, cardinality=32)}), 3, sizes=(64,))
  assert dense['params'] > grouped['params']
  assert dense['gflops_64'] > grouped['gflops_64']
  assert 'not the reference architecture' in summary.format_table(dense)
  assert 'not the reference architecture' not in summary.format_table(grouped)


def test_summary_of_a_hovernet_config_names_the_official_count():
  from configs import hovernet_consep
  result = summary.summarize(hovernet_consep.get_config(), 4, sizes=())
  assert (result['method'], result['params'], result['margin']) == ('hovernet', 54_744_457, 95)
  assert any('54,744,457 parameters (equal)' in note for note in result['notes'])
  assert 'Valid convolutions' in summary.format_table(result)
