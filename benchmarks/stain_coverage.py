"""What the stain augmentation presets cover and what the stress levels do, on real CoNSeP crops (no model).

    python benchmarks/stain_coverage.py [--data=../shared/data/consep/images] [--draws=4]

1. Augmentation: every 8th CoNSeP Train crop, `--draws` draws per preset: 5th / 50th / 95th percentiles of a
   crop's mean tissue L*, of the L* of its darkest 5 % of tissue pixels (the nuclei), of their changes, and
   of the ratio of mean tissue optical density to the clean crop's.
2. Stress levels: every 4th CoNSeP Test crop, the mean tissue L* under each level of `robustness.STRESS_LEVELS`.
The README's 'Stain robustness' tables come from this script.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
import _machine  # noqa: E402


def _load(pattern: str, step: int) -> np.ndarray:
  from PIL import Image
  paths = sorted(glob.glob(pattern))[::step]
  if not paths:
    raise SystemExit(f'no image matches {pattern}')
  return np.stack([np.asarray(Image.open(p).convert('RGB')) for p in paths])


def _per_image(images: np.ndarray) -> np.ndarray:
  """[N, 3]: mean tissue L*, L* of the darkest 5 % tissue pixels, mean tissue optical density."""
  from dualunet_jax.data import stain
  rows = []
  for image in images:
    pixels = image[stain.tissue_mask(image)]
    lightness = stain.rgb_to_lab(pixels)[:, 0]
    rows.append((lightness.mean(), np.percentile(lightness, 5), stain.optical_density(pixels).mean()))
  return np.array(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data', default=os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data',
                                                     'consep', 'images'))
  parser.add_argument('--draws', type=int, default=4)
  args = parser.parse_args()
  import jax
  from dualunet_jax import robustness
  from dualunet_jax.data import augment
  print(_machine.describe())

  train = _load(os.path.join(args.data, 'train', '*.jpg'), 8)
  batch = {'image': train, 'class_map': np.zeros(train.shape[:3], np.int32)}
  base = _per_image(train)
  q = lambda v, f='.1f': ' / '.join(f'{x:{f}}' for x in np.percentile(v, [5, 50, 95]))
  print(f'\n{len(train)} CoNSeP Train crops, {args.draws} draws per preset (5th / 50th / 95th percentiles)')
  print(f'  clean : mean L* {q(base[:, 0])} | darkest-5% L* {q(base[:, 1])}')
  for preset in ('paper', 'strong'):
    draws = []
    for r in range(args.draws):
      out = augment.augment_batch(jax.random.key(r), batch, {'stain_preset': preset})
      draws.append(_per_image(np.rint(np.asarray(out['image']) * 255).astype(np.uint8)))
    s = np.concatenate(draws)
    ref = np.tile(base, (args.draws, 1))
    print(f'  {preset:<6s}: mean L* {q(s[:, 0])}, change {q(s[:, 0] - ref[:, 0])} | darkest-5% L* {q(s[:, 1])}, '
          f'change {q(s[:, 1] - ref[:, 1])} | OD ratio {q(s[:, 2] / ref[:, 2], ".2f")}')

  test = _load(os.path.join(args.data, 'test', '*.jpg'), 4)
  print(f'\n{len(test)} CoNSeP Test crops: mean tissue L* per stress level')
  for name, level in robustness.STRESS_LEVELS.items():
    lightness = [robustness.mean_lightness(level.image_fn(image)) for image in test]
    print(f'  {name:<11s} {level.description:<24s} {np.nanmean(lightness):5.1f}')


if __name__ == '__main__':
  main()
