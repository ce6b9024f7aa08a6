"""Train any method (`config.method`): `python -m dualunet_jax.train --config=configs/pannuke.py --workdir=W`.

Resumes automatically when `W` already holds checkpoints (same step, optimizer state, data order and training
phase: `config.train.freeze_encoder_epochs`, see trainer.py). Ctrl-C or SIGTERM (preemption, a job's time
limit) saves a checkpoint at the current step first; SIGTERM then exits with status 143.
Override any config field on the command line: `--config.train.batch_size=16`. Multi-host (SLURM, TPU pods):
add `--distributed` on every host (see launch/).
"""

import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dualunet_jax import trainer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics, TensorBoard files and the config go.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() first (multi-host).')
flags.DEFINE_integer('max_steps', None, 'Stop after this many steps (smoke runs).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO; `-v 0` brings it back
  if FLAGS.distributed:
    jax.distributed.initialize()
  logging.info('devices: %s (process %d of %d)', jax.devices(), jax.process_index(), jax.process_count())
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, max_steps=FLAGS.max_steps)
  except trainer.Preempted as e:  # saved; 128 + SIGTERM tells the scheduler it was terminated, not finished
    print(e, file=sys.stderr)
    sys.exit(128 + signal.SIGTERM)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
